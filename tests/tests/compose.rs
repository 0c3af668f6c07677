//! Compose files as deploy input on a 2-machine namespace cluster:
//! `deploy -f` deploys a two-service file (environment with `.env`
//! interpolation, entrypoint and command, a named volume, replicas, a memory
//! limit, a healthcheck, depends_on with `condition: service_healthy`) in
//! dependency order and it serves; a file with keys ployz does not support
//! is refused listing each with its line (exit 6) and nothing is created; `service ls` groups by project; `deploy rm -f` removes
//! the project's services.

use ployz_tests::images::busybox_image;
use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, stderr, stdout, Machine};
use serde_json::Value;
use std::time::Duration;

const COMPOSE: &str = r#"services:
  web:
    image: ./busybox.tar
    entrypoint: ["sh", "-c"]
    command: ["echo \"$$GREETING from $$ROLE\" > /www/index.html && exec httpd -f -p 8080 -h /www"]
    environment:
      GREETING: ${GREETING:-unset}
      ROLE: web
    volumes:
      - www:/www
    deploy:
      replicas: 2
      resources:
        limits:
          memory: 64M
    depends_on:
      cache:
        condition: service_healthy
  cache:
    image: ./busybox.tar
    command: ["sh", "-c", "echo $$ROLE > /tmp/index.html && exec httpd -f -p 8080 -h /tmp"]
    environment:
      - ROLE=cache
    healthcheck:
      test: ["CMD", "test", "-s", "/tmp/index.html"]
      interval: 1s
      timeout: 2s
      retries: 3
      start_period: 10s
volumes:
  www:
"#;

const REFUSED: &str = r#"services:
  app:
    build: .
    image: ./busybox.tar
    privileged: true
"#;

fn services(m: &Machine) -> Vec<Value> {
    m.ctl_json(&["service", "ls"])["services"]
        .as_array()
        .unwrap()
        .clone()
}

fn operations(m: &Machine) -> usize {
    m.ctl_json(&["op", "ls"])["operations"]
        .as_array()
        .unwrap()
        .len()
}

/// Every JSON document ployzctl printed, in order.
fn documents(text: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .map(|v| v.unwrap())
        .collect()
}

#[test]
fn compose_files_deploy_in_dependency_order_refuse_unsupported_keys_and_remove() {
    let tb = Testbed::new(2);
    let ms = ployz_tests::cluster_on(&tb, "composetest");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    std::fs::create_dir(&dir).unwrap();
    let image = busybox_image(&dir, "busybox", &["true"]);
    assert_eq!(image, dir.join("busybox.tar"));
    let file = dir.join("compose.yaml");
    std::fs::write(&file, COMPOSE).unwrap();
    std::fs::write(dir.join(".env"), "GREETING=hello-from-dotenv\n").unwrap();
    let file = file.to_str().unwrap();

    // A file with unsupported keys: each listed with its line, exit 6,
    // nothing deployed (no service, no operation).
    let bad_dir = tmp.path().join("bad");
    std::fs::create_dir(&bad_dir).unwrap();
    busybox_image(&bad_dir, "busybox", &["true"]);
    let bad = bad_dir.join("compose.yaml");
    std::fs::write(&bad, REFUSED).unwrap();
    let ops_before = operations(&ms[0]);
    let o = ms[0].ctl(&["deploy", "-f", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("line 3: services.app.build"), "{err}");
    assert!(err.contains("line 5: services.app.privileged"), "{err}");
    assert!(err.contains("--ignore-unsupported"), "{err}");
    assert!(services(&ms[0]).is_empty());
    assert_eq!(operations(&ms[0]), ops_before, "no operation started");

    // The two-service file: the dependency first, then web; one block each.
    let o = ms[0].ctl(&["--json", "deploy", "-f", file]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let docs = documents(&stdout(&o));
    let names: Vec<&str> = docs.iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["shop-cache", "shop-web"], "{docs:#?}");
    for d in &docs {
        assert_eq!(d["project"], "shop", "{d:#}");
        assert!(
            d["instances"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["state"] == "running"),
            "{d:#}"
        );
    }
    // The compose healthcheck is the cache's health check, and web was
    // deployed once the cache was healthy (service_healthy).
    let cache = &docs[0];
    assert_eq!(
        cache["health_check"]["probe"]["command"], "test -s /tmp/index.html",
        "{cache:#}"
    );
    assert_eq!(cache["health_check"]["interval_ms"], 1000, "{cache:#}");
    assert_eq!(cache["health_check"]["retries"], 3, "{cache:#}");
    assert_eq!(cache["instances"][0]["health"], "healthy", "{cache:#}");
    assert!(docs[1]["health_check"].is_null(), "{:#}", docs[1]);
    let web = &docs[1];
    assert_eq!(web["replicas"], 2, "{web:#}");
    assert_eq!(web["volumes"][0], "shop-www:/www", "{web:#}");
    // Each replica serves the page it wrote into its volume, with the
    // environment interpolated from `.env`.
    for i in web["instances"].as_array().unwrap() {
        let ip = i["overlay_ip"].as_str().unwrap().to_string();
        let page = eventually(Duration::from_secs(20), || {
            let o = ms[1].exec(
                "curl",
                &["-sf", "-m", "3", &format!("http://{ip}:8080/index.html")],
            );
            o.status.success().then(|| stdout(&o))
        });
        assert_eq!(
            page.as_deref().map(str::trim),
            Some("hello-from-dotenv from web")
        );
    }
    let cache_ip = docs[0]["instances"][0]["overlay_ip"]
        .as_str()
        .unwrap()
        .to_string();
    let page = eventually(Duration::from_secs(20), || {
        let o = ms[0].exec(
            "curl",
            &[
                "-sf",
                "-m",
                "3",
                &format!("http://{cache_ip}:8080/index.html"),
            ],
        );
        o.status.success().then(|| stdout(&o))
    });
    assert_eq!(page.as_deref().map(str::trim), Some("cache"));

    // `service ls` groups by project: a service deployed alone, then the project.
    ms[0].deploy(&[
        "alone",
        "--image",
        image.to_str().unwrap(),
        "--",
        "sleep",
        "600",
    ]);
    let ls = services(&ms[0]);
    let rows: Vec<(Value, Value)> = ls
        .iter()
        .map(|s| (s["project"].clone(), s["name"].clone()))
        .collect();
    assert_eq!(
        rows,
        [
            (Value::Null, "alone".into()),
            ("shop".into(), "shop-cache".into()),
            ("shop".into(), "shop-web".into()),
        ]
    );
    let table = stdout(&ms[0].ctl(&["service", "ls"]));
    assert!(table.starts_with("PROJECT"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("shop") && l.contains("shop-web")),
        "{table}"
    );

    // `deploy rm -f` removes the project's services, and only those.
    let o = ms[0].ctl(&["deploy", "rm", "-f", file]);
    assert!(o.status.success(), "{}", stderr(&o));
    let left: Vec<Value> = services(&ms[0]).iter().map(|s| s["name"].clone()).collect();
    assert_eq!(left, [Value::from("alone")]);
    ms[0].ctl_json(&["service", "rm", "alone"]);
}
