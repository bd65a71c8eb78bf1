//! The three-node example under `deploy/three-node/` stays true: its NATS configs are exactly
//! what `citywatch cluster nats-config` prints for them today (so a change of the generator
//! shows up here, and `generate` is re-run), and each gateway config passes `check-config`
//! as a cluster node.

use std::process::Command;

use citywatch_tests::{citywatch_bin, workspace_root};

#[test]
fn the_three_node_example_is_what_the_generator_prints_and_its_gateways_check() {
    let dir = workspace_root().join("deploy/three-node");
    let routes = "nats://h1:6222,nats://h2:6222,nats://h3:6222";
    for i in 1..=3 {
        let out = Command::new(citywatch_bin())
            .args(["cluster", "nats-config", "--name", &format!("n{i}"), "--host", "0.0.0.0", "--port", "4222", "--cluster-port", "6222"])
            .args(["--mqtt-port", "1883", "--http-port", "8222", "--store", &format!("/var/lib/nats/n{i}"), "--routes", routes, "--partitions", "64"])
            .args(["--gateway-user", "gateway", "--device-user", "device"])
            .output()
            .expect("citywatch cluster nats-config runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let committed = std::fs::read_to_string(dir.join(format!("nats/n{i}.conf"))).expect("nats config in deploy/");
        assert_eq!(committed, String::from_utf8_lossy(&out.stdout), "deploy/three-node/nats/n{i}.conf is stale: run deploy/three-node/generate");

        let gateway = dir.join(format!("gateway/gw-{i}.toml"));
        let out = Command::new(citywatch_bin()).arg("check-config").arg(&gateway).output().expect("citywatch check-config runs");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}: {}{}", gateway.display(), said, String::from_utf8_lossy(&out.stderr));
        assert!(said.contains(&format!("cluster node gw-{i} on 3 NATS URL(s), 64 partitions")), "{said}");
    }
}
