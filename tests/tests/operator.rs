//! What an operator sees: the status page, rendered by a real browser and checked against the
//! API, and logs a collector can read.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use zklb_tests::{eventually, ControlPlane, ZooKeeper};
use zookeeper_client::{Acls, Client, CreateMode};

async fn create(client: &Client, path: &str, data: Value) {
    let data = if data.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(&data).expect("json")
    };
    client
        .create(
            path,
            &data,
            &CreateMode::Persistent.with_acls(Acls::anyone_all()),
        )
        .await
        .unwrap_or_else(|error| panic!("creating {path}: {error}"));
}

/// Headless Chromium (Debian's, installed by `scripts/setup`) run on `url`: `--dump-dom` gives
/// the document as the browser built it, `--screenshot` a PNG of it.
fn chromium(arguments: &[&str], url: &str, dir: &std::path::Path) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .args(["--disable-extensions", "--disable-background-networking"])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium").display()
        ))
        .args(arguments)
        .arg(url)
        .output()
        .expect("running chromium")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_what_the_api_lists_and_the_log_is_json() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let zookeeper = ZooKeeper::start(dir.path()).await;
    let control_plane = ControlPlane::start_with(
        &zookeeper,
        &["/services=auto"],
        &["--log-format", "json"],
        dir.path(),
    )
    .await;
    let registrar = zookeeper.client().await;
    create(&registrar, "/services/orders", Value::Null).await;
    create(&registrar, "/services/orders/a", json!({"address": "127.0.0.1", "port": 9001,
        "registrationTimeUTC": 1_732_000_000_000_i64, "payload": {"metadata": {"zone": "eu-1a", "weight": "3"}}})).await;
    create(
        &registrar,
        "/services/orders/b",
        json!({"address": "localhost", "port": 9002, "enabled": false}),
    )
    .await;
    create(
        &registrar,
        "/services/orders/broken",
        json!({"address": "127.0.0.1", "port": 0}),
    )
    .await;
    create(&registrar, "/services/Orders", Value::Null).await;
    create(&registrar, "/services/web", Value::Null).await;
    create(
        &registrar,
        "/services/web/i-1_0000000001",
        json!({"host": "127.0.0.1", "port": 9003, "name": "i-1"}),
    )
    .await;

    let listing = eventually(
        Duration::from_secs(20),
        "the registry is listed",
        || async {
            let listing = control_plane.get("/v1/services").await?;
            let resolved = listing["services"]["orders"]["instances"]
                .as_array()
                .is_some_and(|all| {
                    all.iter()
                        .any(|i| i["hostname"] == "localhost" && i["address"] == "127.0.0.1")
                });
            // The web instance is the last znode created: once it is listed, no later version
            // can come between this listing and the page.
            let web_instance = listing["services"]["web"]["instances"]
                .as_array()
                .is_some_and(|all| !all.is_empty());
            if resolved && listing["conflicts"]["Orders"].is_string() && web_instance {
                Ok(listing)
            } else {
                Err(listing.to_string())
            }
        },
    )
    .await;

    let url = format!("{}/", control_plane.url);
    let dumped = chromium(&["--dump-dom"], &url, dir.path());
    assert!(
        dumped.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    let dom = String::from_utf8(dumped.stdout).expect("UTF-8");
    assert!(
        dom.contains(&format!("<td>{}</td>", listing["version"])),
        "the version"
    );
    for (name, service) in listing["services"].as_object().expect("services") {
        let section = dom
            .split(&format!("id=\"service-{name}\""))
            .nth(1)
            .unwrap_or_else(|| panic!("no section for {name}"));
        let table = section.split("</table>").next().unwrap_or_default();
        for instance in service["instances"].as_array().expect("instances") {
            let row = table
                .split("<tr>")
                .find(|row| {
                    row.contains(&format!(
                        "<td>{}</td>",
                        instance["id"].as_str().unwrap_or_default()
                    ))
                })
                .unwrap_or_else(|| panic!("no row for {instance}"));
            for field in ["address", "port", "weight", "source", "status"] {
                let value = match &instance[field] {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                assert!(row.contains(&value), "{name}: {field} {value} not in {row}");
            }
            if let Some(zone) = instance["zone"].as_str() {
                assert!(row.contains(zone), "{row}");
            }
        }
    }
    for (table, key) in [
        ("malformed", "/services/orders/broken"),
        ("conflicts", "Orders"),
    ] {
        let section = dom
            .split(&format!("id=\"{table}\""))
            .nth(1)
            .unwrap_or_else(|| panic!("no {table} table"));
        let reason = listing[table][key].as_str().expect("a reason");
        let section = section.split("</table>").next().unwrap_or_default();
        assert!(
            section.contains(key) && section.contains(reason),
            "{section}"
        );
    }

    let screenshot = dir.path().join("status.png");
    let shot = chromium(
        &[
            &format!("--screenshot={}", screenshot.display()),
            "--window-size=1200,900",
        ],
        &url,
        dir.path(),
    );
    assert!(
        shot.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("ZKLB_KEEP_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).expect("keeping the screenshot");
    }

    // Every line of the log is a JSON object, and the line about the malformed znode carries
    // what an operator greps for.
    let log = control_plane.log();
    let lines: Vec<Value> = log
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    assert!(lines
        .iter()
        .all(|line| line["timestamp"].is_string() && line["level"].is_string()));
    let malformed = lines
        .iter()
        .find(|line| line["message"] == "skipping malformed instance znode")
        .expect("a line about the malformed znode");
    assert_eq!(malformed["znode"], "/services/orders/broken");
    assert_eq!(malformed["format"], "curator");
    assert!(malformed["error"]
        .as_str()
        .is_some_and(|error| error.contains("0 is not a TCP port")));
}
