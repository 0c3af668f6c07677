//! The web dashboard in a real headless Chromium, driven over the DevTools
//! protocol: a 3-machine cluster renders one row per machine and one RTT
//! cell per ordered pair, a drain done with ployzctl shows up without a
//! reload, and nothing is served without a login.

use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, Machine};
use serde_json::{json, Value};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// A headless Chromium with one page, killed on drop.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium (Debian package chromium)");
        let port_file = profile.path().join("DevToolsActivePort");
        let port = eventually(Duration::from_secs(30), || {
            let s = std::fs::read_to_string(&port_file).ok()?;
            s.lines().next()?.trim().parse::<u16>().ok()
        })
        .expect("chromium opened its DevTools port");
        let ws_url = eventually(Duration::from_secs(30), || {
            let out = Command::new("curl")
                .args(["-sS", &format!("http://127.0.0.1:{port}/json/list")])
                .output()
                .ok()?;
            let targets: Value = serde_json::from_slice(&out.stdout).ok()?;
            targets.as_array()?.iter().find(|t| t["type"] == "page")?["webSocketDebuggerUrl"]
                .as_str()
                .map(str::to_string)
        })
        .expect("a page target");
        let (ws, _) = tungstenite::connect(ws_url).expect("DevTools websocket");
        Browser {
            child,
            _profile: profile,
            ws,
            next: 0,
        }
    }

    /// `Runtime.evaluate` of `expr` in the page, by value.
    fn eval(&mut self, expr: &str) -> Value {
        self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        )["result"]["value"]
            .clone()
    }

    /// One DevTools method call; its `result`.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let m = self.ws.read().expect("DevTools answer");
            let Ok(text) = m.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if v["id"] == id {
                return v["result"].clone();
            }
        }
    }
}

fn http_status(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dashboard_shows_machines_rtt_heatmap_and_live_changes() {
    let tb = Testbed::new(3);
    // The founder serves its dashboard on its host address, so the browser
    // (outside the host's namespace) reaches it.
    let ui = format!("{}:7180", tb.hosts[0].ip);
    let founder = Machine::start_in(&tb.hosts[0], &["--ui-listen", &ui]);
    founder.ctl_json(&["mesh", "init", "dashnet"]);
    let mut ms = vec![founder];
    for h in &tb.hosts[1..] {
        let m = Machine::start_in(h, &[]);
        let token = ms[0].invite();
        m.ctl_json(&["machine", "invite", "import", "--token", &token]);
        ms.push(m);
    }
    let ids: Vec<String> = ms.iter().map(Machine::id).collect();

    // Without a session nothing is served; a login link works once.
    assert_eq!(http_status(&format!("http://{ui}/")), "401");
    assert_eq!(http_status(&format!("http://{ui}/api/state")), "401");
    let link = ms[0].ctl_json(&["dashboard"])["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        link.starts_with(&format!("http://{ui}/login?token=")),
        "{link}"
    );
    let spent = ms[0].ctl_json(&["dashboard"])["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(http_status(&spent), "303");
    assert_eq!(http_status(&spent), "403", "a login link works once");
    assert_eq!(
        http_status(&format!("http://{ui}/login?token=forged")),
        "403"
    );

    let mut b = Browser::open(&link);
    let rows_and_cells = "JSON.stringify({rows: [...document.querySelectorAll('[data-testid=machine-row]')].map(r => r.textContent), cells: document.querySelectorAll('[data-testid=rtt-heatmap] [data-testid=rtt-cell]').length, measured: document.querySelectorAll('[data-testid=rtt-cell].cell:not(.unreachable)').length})";
    let seen = eventually(Duration::from_secs(60), || {
        let v: Value = serde_json::from_str(b.eval(rows_and_cells).as_str()?).ok()?;
        let rows = v["rows"].as_array()?;
        let all_rows = rows.len() == 3
            && ids
                .iter()
                .all(|id| rows.iter().any(|r| r.as_str().unwrap_or("").contains(id)));
        (all_rows && v["cells"] == 6 && v["measured"] == 6).then_some(v)
    });
    let seen = seen.unwrap_or_else(|| panic!("{}", b.eval(rows_and_cells)));
    println!("dashboard rendered: {seen}");
    let tooltip = b.eval("document.querySelector('[data-testid=rtt-cell]').title");
    assert!(
        tooltip.as_str().unwrap().contains("median")
            && tooltip.as_str().unwrap().contains("samples"),
        "{tooltip}"
    );

    // A drain done with ployzctl shows up without a reload.
    b.eval("window.__sameDocument = true");
    ms[0].ctl_json(&["machine", "drain", &ids[2]]);
    let lifecycle = format!(
        "(document.querySelector('[data-machine=\"{}\"] [data-testid=lifecycle]') || {{}}).textContent + '/' + window.__sameDocument",
        ids[2]
    );
    let live = eventually(Duration::from_secs(20), || {
        let v = b.eval(&lifecycle);
        (v == "draining/true").then_some(())
    });
    assert!(live.is_some(), "{}", b.eval(&lifecycle));
    // For a look at the page: PLOYZ_DASHBOARD_PNG=/path/shot.png.
    if let Ok(path) = std::env::var("PLOYZ_DASHBOARD_PNG") {
        use base64::Engine as _;
        let shot = b.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}
