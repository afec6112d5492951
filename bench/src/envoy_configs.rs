//! The Envoy configurations the benchmarks compare with zklb's: plain Envoy from the templates of
//! `bench/envoy/`, and zklb's own configuration (`envoy/envoy.yaml`, rendered by the project's
//! script) with the zklb filter taken out.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use zklb_tests::stack::{free_port, workspace_root, Envoy};

/// Envoy from `bench/envoy/<template>` on `workers` workers, its files in `dir`: the template's
/// variables other than its ports are `more` (`BENCH_ENDPOINTS`, say: [`endpoints_yaml`]). A
/// `launcher` that is not empty starts Envoy (see [`Envoy::start_under`]).
pub async fn start_template(
    dir: &Path,
    template: &str,
    more: &[(&str, String)],
    workers: u32,
    launcher: &[String],
) -> anyhow::Result<Envoy> {
    let (listen_port, admin_port) = (free_port(), free_port());
    let mut variables = vec![
        ("BENCH_LISTEN_PORT", listen_port.to_string()),
        ("BENCH_ADMIN_PORT", admin_port.to_string()),
    ];
    variables.extend(more.iter().cloned());
    let rendered = render_template(template, &variables)?;
    start_rendered(dir, &rendered, listen_port, admin_port, workers, launcher).await
}

/// `bench/envoy/<template>` with its variables replaced.
pub fn render_template(template: &str, variables: &[(&str, String)]) -> anyhow::Result<String> {
    let path = template_path(template);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    render(&text, variables).with_context(|| format!("rendering {}", path.display()))
}

fn template_path(template: &str) -> PathBuf {
    workspace_root().join("bench/envoy").join(template)
}

/// Envoy on `config`, written into `dir`, once live; started by `launcher` if it is not empty.
pub async fn start_rendered(
    dir: &Path,
    config: &str,
    listen_port: u16,
    admin_port: u16,
    workers: u32,
    launcher: &[String],
) -> anyhow::Result<Envoy> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    Ok(Envoy::start_under(launcher, path, listen_port, admin_port, workers, dir).await)
}

/// Replaces each `${NAME}` by its value; refuses to leave a `${` behind.
pub fn render(template: &str, variables: &[(&str, String)]) -> anyhow::Result<String> {
    let mut text = template.to_string();
    for (name, value) in variables {
        text = text.replace(&format!("${{{name}}}"), value);
    }
    if let Some(at) = text.find("${") {
        let rest: String = text[at..].chars().take(40).collect();
        bail!("no value for {rest:?}");
    }
    Ok(text)
}

/// The `lb_endpoints` entries of a static cluster, indented for the templates.
pub fn endpoints_yaml(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|port| {
            format!(
                "              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}\n"
            )
        })
        .collect()
}

/// zklb's rendered configuration without the zklb filter: no poller, no HTTP filter, no learner
/// in the access log, no attempt numbering (it is there for the learner alone). With
/// `cluster`, the routes send every request to it (one service's cluster from the control plane)
/// instead of the cluster the filter names; without, they still route by the cluster header, and
/// `override_host` still follows the candidate header, whoever wrote them: the client, here. What
/// stays is all the rest of zklb's setup: the clusters and members over ADS, the `override_host`
/// policy (which, given no candidates, falls back to random), the upstream removal of the
/// candidate header, the retry policy.
pub fn without_zklb_filter(rendered: &str, cluster: Option<&str>) -> anyhow::Result<String> {
    let lines: Vec<&str> = rendered.lines().collect();
    let poller = block(&lines, |line| line == "bootstrap_extensions:")
        .context("no bootstrap_extensions (the poller) in zklb's configuration")?;
    let filter = block(&lines, |line| {
        line.trim() == "- name: envoy.filters.http.wasm"
    })
    .context("no wasm HTTP filter in zklb's configuration")?;
    let learner = block(&lines, |line| line.trim() == "access_log:")
        .context("no access log (the learner) in zklb's configuration")?;
    let routed_by_filter = format!("cluster_header: {}", zklb_wire::CLUSTER_HEADER);
    if !rendered.contains(&routed_by_filter) {
        bail!("zklb's routes do not follow {}", zklb_wire::CLUSTER_HEADER);
    }
    let mut kept = String::new();
    for (index, line) in lines.iter().enumerate() {
        let numbering_attempts = line.trim() == "include_request_attempt_count: true";
        if poller.contains(&index)
            || filter.contains(&index)
            || learner.contains(&index)
            || numbering_attempts
        {
            continue;
        }
        kept.push_str(line);
        kept.push('\n');
        if line.trim() == "route_config:" {
            // The route names a cluster that only comes over ADS: Envoy must not refuse the
            // configuration for naming a cluster it does not have yet.
            let indentation = line.len() - line.trim_start().len() + 2;
            kept.push_str(&format!("{:indentation$}validate_clusters: false\n", ""));
        }
    }
    if !kept.contains("validate_clusters: false") {
        bail!("no route_config in zklb's configuration");
    }
    Ok(match cluster {
        Some(cluster) => kept.replace(&routed_by_filter, &format!("cluster: {cluster}")),
        None => kept,
    })
}

/// The lines of the first YAML block whose opening line `starts` says so: that line and every
/// line after it that is blank or indented deeper.
fn block(lines: &[&str], starts: impl Fn(&str) -> bool) -> Option<std::ops::Range<usize>> {
    let indentation = |line: &str| line.len() - line.trim_start().len();
    let first = lines.iter().position(|line| starts(line))?;
    let depth = indentation(lines[first]);
    let end = lines[first + 1..]
        .iter()
        .position(|line| !line.trim().is_empty() && indentation(line) <= depth)
        .map_or(lines.len(), |offset| first + 1 + offset);
    Some(first..end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zklb_tests::stack::{render_envoy_config, validate_envoy_config};

    #[test]
    fn templates_are_rendered_completely() {
        let rendered =
            render("a ${X} b ${Y}", &[("X", "1".into()), ("Y", "2".into())]).expect("renders");
        assert_eq!(rendered, "a 1 b 2");
        let error = render("a ${X} b ${Z}", &[("X", "1".into())]).expect_err("Z has no value");
        assert!(error.to_string().contains("${Z}"), "{error}");
    }

    /// The variables of `template`, with made-up values.
    fn variables_of(template: &str) -> Vec<(&'static str, String)> {
        let mut variables = vec![
            ("BENCH_LISTEN_PORT", "10000".to_string()),
            ("BENCH_ADMIN_PORT", "9901".to_string()),
        ];
        let more: &[(&'static str, &str)] = match template {
            "native-random.yaml" => &[],
            "noop-wasm.yaml" => &[("BENCH_FILTER_WASM", "/x.wasm")],
            "native-failover.yaml" => &[
                ("BENCH_CONTROL_PLANE_PORT", "18000"),
                ("BENCH_EDS_SERVICE", "zklb_service_failover"),
            ],
            other => panic!("no variables known for {other}"),
        };
        if template != "native-failover.yaml" {
            variables.push(("BENCH_ENDPOINTS", endpoints_yaml(&[8081, 8082, 8083])));
        }
        variables.extend(more.iter().map(|(name, value)| (*name, value.to_string())));
        variables
    }

    /// The templates that need no wasm module validate (Envoy loads a module even to validate;
    /// `bench/run` starts the noop variant and fails if Envoy refuses it).
    #[test]
    fn wasm_free_templates_validate() {
        let dir = tempfile::tempdir().expect("temporary directory");
        for template in ["native-random.yaml", "native-failover.yaml"] {
            let rendered = render_template(template, &variables_of(template)).expect("renders");
            let config = dir.path().join(template);
            std::fs::write(&config, rendered).expect("writing");
            if let Err(reasons) = validate_envoy_config(&config) {
                panic!("envoy rejected bench/envoy/{template}:\n{reasons}");
            }
        }
    }

    #[test]
    fn shipped_templates_take_exactly_their_variables_and_listen_on_loopback() {
        for template in [
            "native-random.yaml",
            "noop-wasm.yaml",
            "native-failover.yaml",
        ] {
            let rendered = render_template(template, &variables_of(template))
                .unwrap_or_else(|error| panic!("{template}: {error:#}"));
            assert!(
                !rendered.contains("0.0.0.0"),
                "{template} listens beyond 127.0.0.1"
            );
            for (name, _) in variables_of(template) {
                let text = std::fs::read_to_string(template_path(template)).expect("template");
                assert!(
                    text.contains(&format!("${{{name}}}")),
                    "{template} lacks {name}"
                );
            }
        }
    }

    #[test]
    fn the_filter_is_taken_out_of_zklbs_configuration_and_nothing_else() {
        let rendered = render_envoy_config(10000, 9901, 18000);
        let cluster = zklb_wire::cluster_name("echo");
        let without = without_zklb_filter(&rendered, Some(&cluster)).expect("derives");
        let by_header = without_zklb_filter(&rendered, None).expect("derives");
        for derived in [&without, &by_header] {
            for gone in [
                "envoy.bootstrap.wasm",
                "envoy.filters.http.wasm",
                "zklb_filter.wasm\"",
                "envoy.access_loggers.wasm",
                "include_request_attempt_count",
            ] {
                assert!(!derived.contains(gone), "{gone} is left:\n{derived}");
            }
            for kept in [
                "ads_config:",
                "cds_config:",
                "envoy.filters.http.router",
                "retry_host_predicate:",
                "zklb_control_plane",
                "use_remote_address: true",
            ] {
                assert!(derived.contains(kept), "{kept} is gone:\n{derived}");
            }
        }
        assert!(!without.contains("cluster_header"), "{without}");
        assert_eq!(
            without.matches(&format!("cluster: {cluster}")).count(),
            rendered.matches("cluster_header:").count()
        );
        assert_eq!(
            by_header.matches("cluster_header:").count(),
            rendered.matches("cluster_header:").count()
        );
        let dir = tempfile::tempdir().expect("temporary directory");
        for (name, derived) in [("without", &without), ("by_header", &by_header)] {
            let config = dir.path().join(format!("{name}.yaml"));
            std::fs::write(&config, derived).expect("writing");
            if let Err(reasons) = validate_envoy_config(&config) {
                panic!("envoy rejected zklb's configuration without the filter:\n{reasons}");
            }
        }
    }

    #[test]
    fn a_block_ends_where_its_indentation_does() {
        let lines = [
            "a:",
            "  - name: x",
            "    b: 1",
            "",
            "    c: 2",
            "  - name: y",
            "d:",
        ];
        assert_eq!(block(&lines, |line| line.trim() == "- name: x"), Some(1..5));
        assert_eq!(block(&lines, |line| line == "d:"), Some(6..7));
        assert_eq!(block(&lines, |line| line == "e:"), None);
    }
}
