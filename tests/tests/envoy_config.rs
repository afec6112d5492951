//! The shipped Envoy configurations (native and compose, both rendered from one template) are
//! valid, and a broken filter configuration is refused at load.

use std::process::Command;
use std::time::Duration;

use zklb_tests::eventually;
use zklb_tests::stack::{
    envoy_binary, filter_wasm, render_compose_envoy_config, render_envoy_config,
    validate_envoy_config, workspace_root,
};

#[test]
fn shipped_envoy_config_validates() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, render_envoy_config(10000, 9901, 18000)).expect("writing the config");
    if let Err(reasons) = validate_envoy_config(&config) {
        panic!("envoy rejected envoy/envoy.yaml:\n{reasons}");
    }
}

/// docker-compose.yml mounts envoy/envoy-compose.yaml into Envoy's container: it must be the
/// template's compose rendering, and valid.
#[test]
fn compose_envoy_config_is_the_rendered_template_and_validates() {
    let rendered = render_compose_envoy_config();
    let committed = std::fs::read_to_string(workspace_root().join("envoy/envoy-compose.yaml"))
        .expect("reading envoy/envoy-compose.yaml");
    assert!(
        committed == rendered,
        "envoy/envoy-compose.yaml is not the template's rendering: \
         scripts/render-envoy-config --compose > envoy/envoy-compose.yaml"
    );

    // Envoy validates the module it names, which the compose stack mounts at a path of its
    // container: the same module is at another path here.
    let container_module = "/etc/envoy/zklb/zklb_filter.wasm";
    assert!(
        committed.contains(container_module),
        "the filter's path in the container"
    );
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("envoy.yaml");
    let local = committed.replace(container_module, &filter_wasm().display().to_string());
    std::fs::write(&config, local).expect("writing the config");
    if let Err(reasons) = validate_envoy_config(&config) {
        panic!("envoy rejected envoy/envoy-compose.yaml:\n{reasons}");
    }
}

/// Each attempt of a request goes to its own candidate only if the filter writes as many
/// candidates as the route makes attempts: both come from one variable of the template.
#[test]
fn filter_retries_and_route_retries_come_from_one_variable() {
    let template = std::fs::read_to_string(workspace_root().join("envoy/envoy.yaml"))
        .expect("reading envoy/envoy.yaml");
    let settings: Vec<&str> = template
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.contains("num_retries") || line.contains(r#""retries""#))
        .collect();
    assert_eq!(settings.len(), 3, "two routes and the filter: {settings:?}");
    assert!(
        settings.iter().all(|line| line.contains("${ZKLB_RETRIES}")),
        "a retry count that is not the shared variable: {settings:?}"
    );
    let rendered = render_envoy_config(10000, 9901, 18000);
    let unrendered: Vec<&str> = rendered
        .lines()
        .filter(|line| !line.trim_start().starts_with('#') && line.contains("${"))
        .collect();
    assert!(
        unrendered.is_empty(),
        "variables left unrendered: {unrendered:?}"
    );
}

#[tokio::test]
async fn invalid_filter_config_is_rejected_at_load_with_the_reason() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("envoy.yaml");
    let broken = render_envoy_config(
        zklb_tests::stack::free_port(),
        zklb_tests::stack::free_port(),
        1,
    )
    .replace(r#""retries": 2"#, r#""retries": 2, "retrys": 3"#);
    std::fs::write(&config, broken).expect("writing the config");
    let log = dir.path().join("envoy.log");
    let mut envoy = Command::new(envoy_binary())
        .args(["--use-dynamic-base-id", "--concurrency", "1", "-c"])
        .arg(&config)
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("starting envoy");
    let status = eventually(Duration::from_secs(60), "Envoy refuses to start", || {
        let exited = envoy.try_wait().map_err(|error| error.to_string());
        async move { exited?.ok_or_else(|| "still running".to_string()) }
    })
    .await;
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = envoy.kill();
    assert!(
        !status.success(),
        "Envoy started with a broken filter configuration"
    );
    assert!(
        output.contains("unknown field `retrys`"),
        "the reason is not in Envoy's log:\n{output}"
    );
}
