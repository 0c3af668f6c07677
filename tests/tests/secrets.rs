//! No secret reaches a log line, an error message or a `--json` answer other
//! than the one that hands it out (issue 17). A 3-machine cluster runs with
//! ployzd's own code at debug level through joins (token on the command
//! line and on stdin), a used, a revoked and a truncated invite, `nats url`,
//! NATS logins with the right and a wrong password, and the usual reads;
//! then every daemon log and every other ployzctl output is searched for
//! each secret: the network key, the NATS password, every invite token (and
//! its signature part), the wrong password a client tried.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ployz_tests::netns::Testbed;
use ployz_tests::{bin, Machine};
use serde_json::Value;

/// ployzd's crates at debug; chatty dependencies at info.
const LOG: &str = "info,ployzd=debug,ployz_consensus=debug,ployz_natsd=debug,ployz_nats_proto=debug,ployz_mesh=debug,ployz_runtime=debug,ployz_provision=debug";

/// Every ployzctl output that is not a hand-out, for the search at the end.
#[derive(Default)]
struct Seen(String);

impl Seen {
    fn ctl(&mut self, m: &Machine, args: &[&str]) -> Output {
        let out = m.ctl(args);
        self.keep(args, &out);
        out
    }

    fn keep(&mut self, args: &[&str], out: &Output) {
        // The command line itself may carry a token (it is ours, not ployzctl's).
        let shown: Vec<&str> = args
            .iter()
            .map(|a| if a.len() > 40 { "<arg>" } else { a })
            .collect();
        self.0.push_str(&format!(
            "\n$ ployzctl {}\n{}{}",
            shown.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// A hand-out: the output is the secret's one legitimate place.
fn handout(m: &Machine, args: &[&str]) -> Value {
    json(&m.ctl(args))
}

/// A raw NATS CONNECT with these credentials from inside `host`'s
/// namespace (bash's /dev/tcp); what the server answered.
fn nats_login(host: &ployz_tests::netns::Host, server: &str, user: &str, pass: &str) -> String {
    let (ip, port) = server.rsplit_once(':').expect("host:port");
    let connect = serde_json::json!({"user": user, "pass": pass, "verbose": false, "protocol": 1});
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/{port} || exit 1; read -t 5 -r info <&3; \
         printf 'CONNECT %s\\r\\nPING\\r\\n' '{connect}' >&3; \
         read -t 5 -r answer <&3; echo \"$answer\""
    );
    let out = host
        .command("bash")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .expect("bash");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn secrets_stay_out_of_logs_errors_and_json() {
    let tb = Testbed::new(3);
    let env = [("RUST_LOG", LOG)];
    let mut seen = Seen::default();
    let mut tokens = Vec::new();

    let founder = Machine::start_in_with_env(&tb.hosts[0], &[], &env);
    json(&seen.ctl(&founder, &["--json", "mesh", "init", "secretsnet"]));
    let mut ms = vec![founder];

    // Machine 1 joins with the token on the command line, machine 2 on stdin.
    let m1 = Machine::start_in_with_env(&tb.hosts[1], &[], &env);
    let t1 = handout(&ms[0], &["--json", "machine", "invite", "create"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    json(&seen.ctl(
        &m1,
        &["--json", "machine", "invite", "import", "--token", &t1],
    ));
    tokens.push(t1.clone());
    ms.push(m1);

    let m2 = Machine::start_in_with_env(&tb.hosts[2], &[], &env);
    let t2 = handout(&ms[0], &["--json", "machine", "invite", "create"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut child = Command::new(bin("ployzctl"))
        .args(["--socket"])
        .arg(m2.socket())
        .args(["--json", "machine", "invite", "import", "--token-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{t2}").unwrap();
    let out = child.wait_with_output().unwrap();
    seen.keep(&["machine invite import --token-stdin"], &out);
    json(&out);
    tokens.push(t2);
    ms.push(m2);

    // A used token again, a revoked one, a truncated one: refused, and the
    // refusals do not repeat them.
    let out = seen.ctl(&ms[1], &["machine", "invite", "import", "--token", &t1]);
    assert!(!out.status.success());
    let t3 = handout(&ms[0], &["--json", "machine", "invite", "create"]);
    let t3_token = t3["token"].as_str().unwrap().to_string();
    let t3_id = t3["invite_id"].as_str().unwrap().to_string();
    let out = seen.ctl(&ms[0], &["machine", "invite", "revoke", &t3_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = seen.ctl(
        &ms[2],
        &[
            "machine",
            "invite",
            "import",
            "--token",
            &t3_token[..t3_token.len() - 10],
        ],
    );
    assert!(!out.status.success());
    tokens.push(t3_token);

    // NATS: the password is handed out by `nats url`; a client logs in with
    // it, another tries a wrong password.
    let nats = handout(&ms[0], &["--json", "nats", "url"]);
    let password = nats["password"].as_str().unwrap().to_string();
    let user = nats["user"].as_str().unwrap().to_string();
    let server = nats["servers"][0].as_str().unwrap().to_string();
    let ok = nats_login(&tb.hosts[0], &server, &user, &password);
    assert!(ok.contains("PONG"), "{ok}");
    // The admin user and an app user (issue 17): handed out once each.
    let admin = handout(&ms[0], &["--json", "nats", "url", "--admin"]);
    let admin_password = admin["password"].as_str().unwrap().to_string();
    let app = handout(
        &ms[0],
        &[
            "--json",
            "nats",
            "user",
            "add",
            "secretsapp",
            "--allow-pub",
            "app.>",
        ],
    );
    let app_password = app["password"].as_str().unwrap().to_string();
    let ok = nats_login(&tb.hosts[0], &server, "secretsapp", &app_password);
    assert!(ok.contains("PONG"), "{ok}");
    json(&seen.ctl(&ms[1], &["--json", "nats", "user", "ls"]));
    let wrong = "wrong-Pa55word-7f3a9c";
    let refused = nats_login(&tb.hosts[0], &server, &user, wrong);
    assert!(refused.contains("-ERR"), "{refused}");

    // The usual reads, as JSON and as tables.
    for m in &ms {
        for args in [
            &["--json", "mesh", "status"][..],
            &["--json", "machine", "ls"],
            &["--json", "machine", "invite", "ls"],
            &["--json", "op", "ls"],
            &["machine", "ls"],
            &["mesh", "status"],
            &["machine", "invite", "ls"],
        ] {
            seen.ctl(m, args);
        }
    }

    // The network key from a machine's cluster file (0600).
    let cluster: Value = serde_json::from_slice(
        &std::fs::read(ms[1].data_dir().join("cluster.json")).expect("cluster.json"),
    )
    .unwrap();
    let key = cluster["secret"]["key"].as_str().unwrap().to_string();
    assert!(key.len() >= 40, "{cluster}");

    let mut secrets: Vec<(String, String)> = vec![
        ("the network key".into(), key),
        ("the NATS password".into(), password),
        ("the NATS admin password".into(), admin_password),
        ("an app user's NATS password".into(), app_password),
        ("a wrong NATS password".into(), wrong.into()),
    ];
    for (i, t) in tokens.iter().enumerate() {
        secrets.push((format!("invite token {i}"), t.clone()));
        let sig = t.rsplit('.').next().unwrap().to_string();
        secrets.push((format!("invite token {i}'s signature"), sig));
    }

    // Let debug logging of the last requests land, then search.
    std::thread::sleep(Duration::from_secs(1));
    let mut places: Vec<(String, String)> = ms
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("machine {i}'s log"), m.log()))
        .collect();
    places.push(("ployzctl's outputs".into(), seen.0.clone()));
    for (place, text) in &places {
        assert!(text.len() > 100, "{place} is nearly empty:\n{text}");
        for (what, secret) in &secrets {
            if let Some(at) = text.find(secret.as_str()) {
                let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let to = text[at..].find('\n').map_or(text.len(), |i| at + i);
                panic!("{what} appears in {place}:\n{}", &text[from..to]);
            }
        }
    }
    // The debug level was on: the logs did record the requests (by name).
    assert!(
        places[0].1.contains("api request"),
        "machine 0 logged no request at debug level"
    );
}
