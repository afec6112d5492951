//! The operator's page at `/`: the registry as the control plane publishes it, how fresh it is,
//! and what is registered but not routed, with the reasons. Server-rendered HTML with inline
//! style and no script, so it needs no build step and works in any browser, even a text one.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use zklb_wire::{Instance, Service, Status};

use crate::snapshot::{Health, Snapshot};

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}\
table{border-collapse:collapse;margin:.4em 0 1em}th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left}\
th{background:#f2f2f2}.up{color:#176b2c}.draining{color:#9a6700}.down,.unknown,.problem{color:#b42318}\
.stale{background:#fff4e5;padding:.5em;border:1px solid #f0b429}code{font-size:.95em}";

/// The page for `snapshot` as of `now` (milliseconds since the Unix epoch).
pub fn render(snapshot: &Snapshot, health: &Health, now: i64) -> String {
    let mut page = String::with_capacity(4096);
    let freshness = health.freshness();
    let _ = write!(
        page,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>zklb control plane</title>\
         <style>{STYLE}</style></head><body><h1>zklb control plane</h1>"
    );
    let instances: usize = snapshot
        .services()
        .values()
        .map(|service| service.instances.len())
        .sum();
    let _ = write!(
        page,
        "<table id=\"summary\"><tr><th>registry version</th><td>{}</td></tr>\
         <tr><th>ZooKeeper session</th><td>{}</td></tr>\
         <tr><th>last read</th><td>{}</td></tr>\
         <tr><th>stale</th><td>{}</td></tr>\
         <tr><th>services</th><td>{}</td></tr><tr><th>instances</th><td>{instances}</td></tr></table>",
        snapshot.version(),
        escape(&freshness.session),
        freshness
            .last_sync
            .map_or("never".to_string(), |at| format!("{} ago", age(now - at))),
        if freshness.stale {
            format!("yes, for {:.0} s", health.stale_seconds())
        } else {
            "no".to_string()
        },
        snapshot.services().len(),
    );
    if let Some(problem) = &health.problem {
        let _ = write!(
            page,
            "<p class=\"stale\" id=\"problem\">{}</p>",
            escape(problem)
        );
    }
    if !snapshot.synced {
        page.push_str(
            "<p class=\"stale\">ZooKeeper has not been read yet: nothing is published.</p>",
        );
    }
    problems_section(&mut page, snapshot);
    page.push_str("<h2>Services</h2>");
    for service in snapshot.services().values() {
        service_section(&mut page, service, now);
    }
    page.push_str("</body></html>");
    page
}

fn problems_section(page: &mut String, snapshot: &Snapshot) {
    let publication = &snapshot.publication;
    let problems = &publication.problems;
    let lists = [
        (
            "conflicts",
            "Name conflicts (not routed)",
            &publication.conflicts,
        ),
        (
            "malformed",
            "Malformed znodes (skipped)",
            &problems.malformed,
        ),
        (
            "unreadable",
            "Unreadable znodes (read again later)",
            &problems.unreadable,
        ),
        (
            "unresolved",
            "Host names that do not resolve",
            &problems.unresolved,
        ),
    ];
    for (id, title, entries) in lists {
        if entries.is_empty() {
            continue;
        }
        let _ = write!(
            page,
            "<h2>{title}</h2><table id=\"{id}\"><tr><th>what</th><th>why</th></tr>"
        );
        for (what, why) in entries {
            let _ = write!(
                page,
                "<tr><td><code>{}</code></td><td class=\"problem\">{}</td></tr>",
                escape(what),
                escape(why)
            );
        }
        page.push_str("</table>");
    }
}

fn service_section(page: &mut String, service: &Service, now: i64) {
    let format = service.format.map_or("?", |format| format.name());
    let _ = write!(
        page,
        "<h3 id=\"service-{name}\">{name}</h3><p>format {format}, version {}, znode <code>{}</code>, \
         {} of {} instances routable</p>",
        service.version,
        escape(&service.znode),
        service.routable_instances().len(),
        service.instances.len(),
        name = escape(&service.name),
    );
    page.push_str(
        "<table><tr><th>id</th><th>address</th><th>port</th><th>format</th><th>status</th>\
         <th>weight</th><th>zone</th><th>age</th></tr>",
    );
    for instance in &service.instances {
        instance_row(page, instance, now);
    }
    page.push_str("</table>");
}

fn instance_row(page: &mut String, instance: &Instance, now: i64) {
    let status = match instance.status {
        Status::Up => "up",
        Status::Draining => "draining",
        Status::Down => "down",
        Status::Unknown => "unknown",
    };
    let address = match &instance.hostname {
        Some(name) => format!("{} ({})", escape(&instance.address), escape(name)),
        None => escape(&instance.address),
    };
    let _ = write!(
        page,
        "<tr><td>{}</td><td>{address}</td><td>{}</td><td>{}</td><td class=\"{status}\">{status}</td>\
         <td>{}</td><td>{}</td><td>{}</td></tr>",
        escape(&instance.id),
        instance.port,
        instance.source.name(),
        instance.weight,
        instance.zone.as_deref().map_or(String::new(), escape),
        instance
            .registered_at
            .map_or(String::new(), |at| age(now - at)),
    );
}

/// A duration in milliseconds, the way a person reads it: `42 s`, `3 min`, `5 h`, `2 d`.
fn age(millis: i64) -> String {
    let seconds = millis.max(0) / 1000;
    match seconds {
        0..=119 => format!("{seconds} s"),
        120..=7_199 => format!("{} min", seconds / 60),
        7_200..=172_799 => format!("{} h", seconds / 3600),
        _ => format!("{} d", seconds / 86_400),
    }
}

/// Text made safe to place in HTML, in elements and in quoted attributes.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Publication;
    use zklb_wire::SourceFormat;

    #[test]
    fn registry_content_is_escaped() {
        let mut instance = Instance::new("<script>", "10.0.0.1", 80, SourceFormat::Curator);
        instance.zone = Some("a\"b".into());
        let service = Service {
            name: "echo".into(),
            version: 3,
            instances: vec![instance],
            ..Service::default()
        };
        let mut publication = Publication::of([service]);
        publication
            .problems
            .malformed
            .insert("/services/x".into(), "<b>bad</b> & worse".into());
        let snapshot = Snapshot::default().succeeded_by(publication);
        let page = render(&snapshot, &Health::default(), 0);
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("a&quot;b"));
        assert!(page.contains("&lt;b&gt;bad&lt;/b&gt; &amp; worse"));
        assert!(page.contains("1 of 1 instances routable"));
    }

    #[test]
    fn ages_read_like_a_person_would_say_them() {
        assert_eq!(age(42_000), "42 s");
        assert_eq!(age(180_000), "3 min");
        assert_eq!(age(5 * 3_600_000), "5 h");
        assert_eq!(age(3 * 86_400_000), "3 d");
        assert_eq!(age(-5), "0 s", "a registrar's clock ahead of ours");
    }
}
