//! A mirror of the ZooKeeper subtrees under the registry roots: every znode read, by path, with
//! its data and the zxids of its stat.
//!
//! Pure bookkeeping. The ingest side is its only writer (after each read and each deletion); the
//! registry formats read services out of it.

use std::collections::{BTreeSet, HashMap};

/// What a read said of one znode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Znode {
    /// zxid of the znode's creation.
    pub czxid: i64,
    /// zxid of the last change to its data.
    pub mzxid: i64,
    /// zxid of the last creation or deletion of one of its children.
    pub pzxid: i64,
    pub num_children: i32,
    pub data: Vec<u8>,
}

impl Znode {
    /// The newest change this read of the znode reflects.
    pub fn newest_zxid(&self) -> i64 {
        self.mzxid.max(self.pzxid)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    nodes: HashMap<String, Znode>,
    /// The names of every known znode's children, by parent path. A parent may have an entry
    /// before it was read itself (its read failed, or comes later).
    children: HashMap<String, BTreeSet<String>>,
}

impl Tree {
    pub fn get(&self, path: &str) -> Option<&Znode> {
        self.nodes.get(path)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Records what a read of `path` returned.
    pub fn put(&mut self, path: &str, znode: Znode) {
        if let Some(known) = self.nodes.get_mut(path) {
            *known = znode;
            return;
        }
        self.nodes.insert(path.to_string(), znode);
        if let Some((parent, name)) = split_path(path) {
            self.children
                .entry(parent.to_string())
                .or_default()
                .insert(name.to_string());
        }
    }

    /// Forgets `path` and everything below it; returns the paths of the znodes forgotten.
    pub fn remove_subtree(&mut self, path: &str) -> Vec<String> {
        let mut removed = Vec::new();
        let mut pending = vec![path.to_string()];
        while let Some(next) = pending.pop() {
            if let Some(names) = self.children.remove(&next) {
                pending.extend(names.iter().map(|name| child_path(&next, name)));
            }
            if self.nodes.remove(&next).is_some() {
                removed.push(next);
            }
        }
        if let Some((parent, name)) = split_path(path) {
            if let Some(siblings) = self.children.get_mut(parent) {
                siblings.remove(name);
                if siblings.is_empty() {
                    self.children.remove(parent);
                }
            }
        }
        removed
    }

    /// The direct children of `path` that have been read, as `(name, znode)` in name order.
    pub fn children<'a>(&'a self, path: &str) -> impl Iterator<Item = (&'a str, &'a Znode)> {
        let parent = path.to_string();
        let names = self.children.get(path);
        names.into_iter().flatten().filter_map(move |name| {
            let znode = self.nodes.get(&child_path(&parent, name))?;
            Some((name.as_str(), znode))
        })
    }

    /// Every znode, by path, in no particular order.
    pub fn into_nodes(self) -> impl Iterator<Item = (String, Znode)> {
        self.nodes.into_iter()
    }

    /// Every znode at or below `path` that has been read, as `(path, znode)`, parents first.
    pub fn subtree(&self, path: &str) -> Vec<(String, &Znode)> {
        let mut found = Vec::new();
        let mut pending = vec![path.to_string()];
        while let Some(next) = pending.pop() {
            if let Some(names) = self.children.get(&next) {
                pending.extend(names.iter().rev().map(|name| child_path(&next, name)));
            }
            if let Some(znode) = self.nodes.get(&next) {
                found.push((next, znode));
            }
        }
        found
    }
}

/// `parent/`, for any parent including the ZooKeeper root.
fn child_prefix(path: &str) -> String {
    if path == "/" {
        "/".to_string()
    } else {
        format!("{path}/")
    }
}

/// `parent/child`, for any parent including the ZooKeeper root.
pub fn child_path(parent: &str, child: &str) -> String {
    format!("{}{child}", child_prefix(parent))
}

/// The parent of a path below the ZooKeeper root.
pub fn parent_path(path: &str) -> Option<&str> {
    split_path(path).map(|(parent, _)| parent)
}

/// A path below the ZooKeeper root as its parent and its own name.
fn split_path(path: &str) -> Option<(&str, &str)> {
    match path.rsplit_once('/')? {
        (_, "") => None,
        ("", name) => Some(("/", name)),
        (parent, name) => Some((parent, name)),
    }
}

/// `path` relative to `root` as its segments (empty for the root itself), or `None` if `path` is
/// not under `root`.
pub fn relative_segments<'a>(root: &str, path: &'a str) -> Option<Vec<&'a str>> {
    if path == root {
        return Some(Vec::new());
    }
    let relative = path.strip_prefix(&child_prefix(root))?;
    Some(relative.split('/').collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn znode(mzxid: i64) -> Znode {
        Znode {
            czxid: mzxid,
            mzxid,
            pzxid: mzxid,
            num_children: 0,
            data: Vec::new(),
        }
    }

    fn tree(paths: &[&str]) -> Tree {
        let mut tree = Tree::default();
        for (i, path) in paths.iter().enumerate() {
            tree.put(path, znode(i as i64));
        }
        tree
    }

    #[test]
    fn children_are_direct_and_in_name_order() {
        let tree = tree(&[
            "/s", "/s/b", "/s/a", "/s/a/1", "/s/a/2", "/s/a-b", "/s/b/x/y", "/sx",
        ]);
        let names: Vec<&str> = tree.children("/s").map(|(name, _)| name).collect();
        assert_eq!(names, ["a", "a-b", "b"]);
        let names: Vec<&str> = tree.children("/s/a").map(|(name, _)| name).collect();
        assert_eq!(names, ["1", "2"]);
        // /s/b/x was never read: /s/b/x/y is known below it, but /s/b lists no child.
        assert_eq!(tree.children("/s/b").count(), 0);
        let names: Vec<&str> = tree.children("/").map(|(name, _)| name).collect();
        assert_eq!(names, ["s", "sx"]);
    }

    #[test]
    fn removing_a_subtree_leaves_its_siblings() {
        let mut tree = tree(&["/s", "/s/a", "/s/a/1", "/s/a-b", "/s/ab", "/sa"]);
        let mut removed = tree.remove_subtree("/s/a");
        removed.sort();
        assert_eq!(removed, ["/s/a", "/s/a/1"]);
        let left: Vec<String> = tree
            .subtree("/")
            .into_iter()
            .map(|(path, _)| path)
            .collect();
        assert_eq!(left, ["/s", "/s/a-b", "/s/ab", "/sa"]);
        assert!(tree.remove_subtree("/nowhere").is_empty());
        assert_eq!(tree.len(), 4);
    }

    #[test]
    fn paths_join_and_split_under_any_root() {
        assert_eq!(child_path("/services", "echo"), "/services/echo");
        assert_eq!(child_path("/", "echo"), "/echo");
        assert_eq!(parent_path("/services/echo"), Some("/services"));
        assert_eq!(parent_path("/services"), Some("/"));
        assert_eq!(parent_path("/"), None);
        assert_eq!(
            relative_segments("/services", "/services/echo/a1"),
            Some(vec!["echo", "a1"])
        );
        assert_eq!(relative_segments("/services", "/services"), Some(vec![]));
        assert_eq!(relative_segments("/services", "/servicesx/echo"), None);
        assert_eq!(relative_segments("/", "/echo"), Some(vec!["echo"]));
    }
}
