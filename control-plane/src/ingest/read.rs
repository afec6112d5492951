//! Reads in chunks: no ZooKeeper request comes near `jute.maxbuffer` (1 MiB by default; a larger
//! request makes the server drop the connection), and a few chunks are in flight at once so that
//! a large registry reads at the speed of the connection rather than of its round trips.

use std::collections::VecDeque;

use zookeeper_client::{Client, MultiReadResult, Stat};

use super::WatchError;
use crate::tree::{child_path, Tree, Znode};

/// Operations per multi-read: ~60 bytes of request each, and typically a few hundred bytes of
/// answer, so a chunk stays far below `jute.maxbuffer` both ways.
const CHUNK: usize = 500;
/// Chunks in flight at once.
const WINDOW: usize = 4;

/// What one read of a znode found.
#[derive(Debug)]
pub enum Found {
    Znode(Znode),
    /// It does not exist (any more).
    Missing,
    /// It cannot be read (no permission, say), and why.
    Unreadable(String),
}

/// Reads the data and stat of every path, in chunks; the results in the order of `paths`.
/// Each chunk is one multi-read, so when everything fits in one, what it says is one moment of
/// the tree.
pub async fn read_data(client: &Client, paths: &[String]) -> Result<Vec<Found>, WatchError> {
    let results = read_chunked(client, paths, |reader, path| reader.add_get_data(path)).await?;
    Ok(results
        .into_iter()
        .map(|result| match result {
            MultiReadResult::Data { data, stat } => Found::Znode(znode(&stat, data)),
            MultiReadResult::Error {
                err: zookeeper_client::Error::NoNode,
            } => Found::Missing,
            MultiReadResult::Error { err } => Found::Unreadable(err.to_string()),
            _ => Found::Unreadable("a multi-read answered out of order".into()),
        })
        .collect())
}

/// The children of every path, in chunks; `Err` for those that cannot be listed.
async fn list_children(
    client: &Client,
    paths: &[String],
) -> Result<Vec<Result<Vec<String>, String>>, WatchError> {
    let results = read_chunked(client, paths, |reader, path| reader.add_get_children(path)).await?;
    Ok(results
        .into_iter()
        .map(|result| match result {
            MultiReadResult::Children { children } => Ok(children),
            MultiReadResult::Error {
                err: zookeeper_client::Error::NoNode,
            } => Ok(Vec::new()),
            MultiReadResult::Error { err } => Err(err.to_string()),
            _ => Err("a multi-read answered out of order".into()),
        })
        .collect())
}

/// Everything at and below `root` (`None` if `root` does not exist), level by level, with the
/// znodes that could not be read and why. `skip` says which subtrees are not worth reading.
pub async fn read_subtree(
    client: &Client,
    root: &str,
    skip: impl Fn(&str) -> bool,
) -> Result<(Option<Tree>, Vec<(String, String)>), WatchError> {
    let mut tree = Tree::default();
    let mut unreadable = Vec::new();
    let mut level = vec![root.to_string()];
    let mut depth = 0;
    while !level.is_empty() {
        let found = read_data(client, &level).await?;
        let mut parents = Vec::new();
        for (path, found) in level.into_iter().zip(found) {
            match found {
                Found::Znode(znode) => {
                    if znode.num_children > 0 {
                        parents.push(path.clone());
                    }
                    tree.put(&path, znode);
                }
                Found::Missing if depth == 0 => return Ok((None, unreadable)),
                Found::Missing => {}
                Found::Unreadable(reason) => unreadable.push((path, reason)),
            }
        }
        let listed = list_children(client, &parents).await?;
        level = Vec::new();
        for (parent, children) in parents.into_iter().zip(listed) {
            match children {
                Ok(children) => level.extend(
                    children
                        .iter()
                        .map(|child| child_path(&parent, child))
                        .filter(|path| !skip(path)),
                ),
                Err(reason) => unreadable.push((parent, reason)),
            }
        }
        depth += 1;
    }
    Ok((Some(tree), unreadable))
}

/// Whether reading `paths` takes a single multi-read, that is, one moment of the tree.
pub fn is_one_read(paths: usize) -> bool {
    paths <= CHUNK
}

async fn read_chunked(
    client: &Client,
    paths: &[String],
    add: impl Fn(&mut zookeeper_client::MultiReader<'_>, &str) -> Result<(), zookeeper_client::Error>,
) -> Result<Vec<MultiReadResult>, WatchError> {
    let mut results = Vec::with_capacity(paths.len());
    let mut in_flight = VecDeque::with_capacity(WINDOW);
    for chunk in paths.chunks(CHUNK) {
        let mut reader = client.new_multi_reader();
        for path in chunk {
            add(&mut reader, path).map_err(|source| WatchError::zookeeper("read", path, source))?;
        }
        // The request leaves now; its answer is awaited below, in order.
        in_flight.push_back((chunk, reader.commit()));
        if in_flight.len() == WINDOW {
            collect(&mut in_flight, &mut results).await?;
        }
    }
    while !in_flight.is_empty() {
        collect(&mut in_flight, &mut results).await?;
    }
    Ok(results)
}

async fn collect<F>(
    in_flight: &mut VecDeque<(&[String], F)>,
    results: &mut Vec<MultiReadResult>,
) -> Result<(), WatchError>
where
    F: std::future::Future<Output = Result<Vec<MultiReadResult>, zookeeper_client::Error>>,
{
    let Some((chunk, answer)) = in_flight.pop_front() else {
        return Ok(());
    };
    let first = chunk.first().map_or("", String::as_str);
    let answered = answer
        .await
        .map_err(|source| WatchError::zookeeper("read", first, source))?;
    if answered.len() != chunk.len() {
        return Err(WatchError::zookeeper(
            "read",
            first,
            zookeeper_client::Error::UnexpectedError(format!(
                "a multi-read of {} znodes answered {}",
                chunk.len(),
                answered.len()
            )),
        ));
    }
    results.extend(answered);
    Ok(())
}

fn znode(stat: &Stat, data: Vec<u8>) -> Znode {
    Znode {
        czxid: stat.czxid,
        mzxid: stat.mzxid,
        pzxid: stat.pzxid,
        num_children: stat.num_children,
        data,
    }
}
