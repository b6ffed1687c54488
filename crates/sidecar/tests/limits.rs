//! Limits under attack, against a real sidecar: slow-loris connections,
//! connections piled on the inbound side, a peer filling the replay cache, and
//! an audit output that fails.
//! Small limits keep the tests short.

#![allow(missing_docs)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chaperone_policy::EffectSet;
use chaperone_sidecar::assertion::{AssertionSigner, Claims, TaskContext};
use chaperone_sidecar::metrics::{ConnectionTimeoutLabels, ListenerLabels, Metrics};
use chaperone_sidecar::peer_keys::PeerKeys;
use chaperone_sidecar::settings::SidecarMode;
use chaperone_sidecar::{AuditOutput, Settings, Sidecar};
use common::*;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn timed_out(metrics: &Metrics, listener: &'static str, timeout: &'static str) -> u64 {
    metrics
        .connections_timed_out
        .get_or_create(&ConnectionTimeoutLabels { listener, timeout })
        .get()
}

fn open(metrics: &Metrics, listener: &'static str) -> i64 {
    metrics
        .connections_open
        .get_or_create(&ListenerLabels { listener })
        .get()
}

fn refused(metrics: &Metrics, listener: &'static str) -> u64 {
    metrics
        .connections_refused
        .get_or_create(&ListenerLabels { listener })
        .get()
}

/// Reads until the peer closes (EOF or reset); `None` if it is still open
/// after `within`.
async fn closed_within(
    stream: &mut (impl AsyncRead + Unpin),
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let left = within.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn slow_loris_connections_are_closed_while_a_normal_call_succeeds() {
    let settings = Settings {
        header_read_timeout: Duration::from_millis(300),
        ..Settings::default()
    };
    let harness = Harness::start_with(false, true, settings).await;
    let metrics = harness.sidecar.metrics();
    // Twenty connections sending a request head one byte every 50 ms: the
    // whole head would take 3 s.
    let mut readers = Vec::new();
    for _ in 0..20 {
        let (read, mut write) = TcpStream::connect(harness.addr).await.unwrap().into_split();
        tokio::spawn(async move {
            let head = b"POST /shop HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Slow: 1\r\n";
            for byte in head {
                if write.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        readers.push(read);
    }
    // Meanwhile the agent's own MCP session works.
    let client = harness.client().await;
    let text = call(&client, "get_order", json!({"id": "o-1"}))
        .await
        .unwrap();
    assert!(text.contains("get_order done"), "{text}");
    for mut read in readers {
        let closed = closed_within(&mut read, Duration::from_secs(2)).await;
        assert!(closed.is_some(), "a slow-loris connection is still open");
    }
    assert!(timed_out(metrics, "proxy", "header") >= 20);
    // The session keeps working after the attack.
    let text = call(&client, "get_order", json!({"id": "o-2"}))
        .await
        .unwrap();
    assert!(text.contains("get_order done"), "{text}");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn a_body_trickled_after_its_head_is_refused_in_time() {
    let settings = Settings {
        header_read_timeout: Duration::from_millis(300),
        ..Settings::default()
    };
    let harness = Harness::start_with(true, true, settings).await;
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_order","arguments":{"id":"o-1"}}}"#;
    let mut stream = TcpStream::connect(harness.addr).await.unwrap();
    let head = format!(
        "POST /shop HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..10]).await.unwrap();
    // The rest would come one byte a second; the sidecar answers first.
    let started = Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered within 5 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(harness.upstream.seen.lock().unwrap().is_empty());
    assert!(
        harness
            .audit
            .records()
            .iter()
            .any(|r| r["rule"] == "protocol/slow_body"),
        "the refusal is audited"
    );
}

#[tokio::test]
async fn idle_connections_piled_on_the_inbound_side_do_not_starve_the_proxy() {
    const CAP: usize = 8;
    const EXTRA: usize = 6;
    let upstream = start_upstream(true).await;
    let settings = Settings {
        inbound_upstream: Some(format!("http://{}", upstream.addr).parse().unwrap()),
        inbound_max_connections: CAP,
        max_connections: CAP,
        header_read_timeout: Duration::from_secs(30),
        ..Settings::default()
    };
    let harness = Harness::start_with(true, true, settings).await;
    let metrics = harness.sidecar.metrics();
    let inbound = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inbound_addr = inbound.local_addr().unwrap();
    let s = harness.sidecar.clone();
    tokio::spawn(async move { s.serve_inbound(inbound, std::future::pending()).await });

    // The cap's worth of idle connections is held...
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(TcpStream::connect(inbound_addr).await.unwrap());
    }
    wait_for("the held connections", || {
        open(metrics, "inbound") == CAP as i64
    })
    .await;
    // ...and every one beyond it is reset at once.
    for _ in 0..EXTRA {
        let mut extra = TcpStream::connect(inbound_addr).await.unwrap();
        let closed = closed_within(&mut extra, Duration::from_secs(2)).await;
        assert!(closed.is_some(), "a connection beyond the cap was kept");
    }
    assert_eq!(refused(metrics, "inbound"), EXTRA as u64);
    assert_eq!(open(metrics, "inbound"), CAP as i64);
    for stream in &mut held {
        let closed = closed_within(stream, Duration::from_millis(20)).await;
        assert!(closed.is_none(), "a held connection was closed");
    }

    // The proxy has its own slots: the agent's calls go through, several at once.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(harness.client().await);
    }
    for (i, client) in clients.iter().enumerate() {
        let text = call(client, "get_order", json!({"id": i})).await.unwrap();
        assert!(text.contains("get_order done"), "{text}");
    }
    assert_eq!(refused(metrics, "proxy"), 0);
    for client in clients {
        client.cancel().await.unwrap();
    }

    // Freed slots serve inbound calls again.
    drop(held);
    wait_for("the held connections to close", || {
        open(metrics, "inbound") == 0
    })
    .await;
    let raw = post_raw(
        &format!("http://{inbound_addr}/mcp"),
        &[],
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
    )
    .await;
    assert!(raw.status.is_success(), "{}: {}", raw.status, raw.body);
}

/// A peer agent that signs assertions with a key the tool's sidecar trusts.
struct Peer {
    signer: AssertionSigner,
    iss: &'static str,
}

impl Peer {
    fn assertion(&self, jti: &str, tool: &str, args: &serde_json::Value) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let ctx = TaskContext {
            effects: EffectSet::EMPTY,
            steps: 1,
            prev: "00".repeat(32),
        };
        let digest = chaperone_sidecar::canonical::args_digest(Some(args));
        self.signer.sign(&Claims {
            iss: self.iss,
            sub: self.iss,
            act: None,
            aud: "billing-tool",
            exp: now + 60,
            iat: now,
            jti,
            sid: "s1",
            tool,
            args: &digest,
            snap: 1,
            ctx: &ctx,
        })
    }

    async fn call(&self, inbound: SocketAddr, jti: &str) -> Raw {
        let args = json!({"id": jti});
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "get_order", "arguments": args}});
        post_raw(
            &format!("http://{inbound}/mcp"),
            &[(
                "chaperone-assertion",
                &self.assertion(jti, "get_order", &args),
            )],
            body.to_string(),
        )
        .await
    }
}

#[tokio::test]
async fn one_peer_filling_its_replay_share_does_not_block_another() {
    const SHARE: usize = 4;
    let tool = start_upstream(true).await;
    let settings = Settings {
        mode: SidecarMode::Tool,
        inbound_upstream: Some(format!("http://{}", tool.addr).parse().unwrap()),
        inbound_audiences: vec!["billing-tool".to_owned()],
        replay_cache_per_issuer: SHARE,
        ..Settings::default()
    };
    let audit = AuditBuffer::default();
    let sidecar = Sidecar::new(
        settings,
        AuditOutput::Writer(Box::new(audit.clone())),
        false,
    )
    .unwrap();
    let attacker = Peer {
        signer: AssertionSigner::generate().unwrap(),
        iss: "chaperone:agent:shop/attacker",
    };
    let victim = Peer {
        signer: AssertionSigner::generate().unwrap(),
        iss: "chaperone:agent:shop/victim",
    };
    let jwk = |peer: &Peer, agent: &str| {
        let mut jwk = peer.signer.registration().jwk.clone();
        jwk["chaperone.dev/agent"] = json!(agent);
        jwk
    };
    let keys = json!({"keys": [jwk(&attacker, "shop/attacker"), jwk(&victim, "shop/victim")]});
    sidecar
        .peer_keys()
        .replace(PeerKeys::from_json(&keys.to_string()).unwrap());
    let inbound = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = inbound.local_addr().unwrap();
    let s = sidecar.clone();
    tokio::spawn(async move { s.serve_inbound(inbound, std::future::pending()).await });

    // The attacker fills its share with live assertions...
    for i in 0..SHARE {
        let raw = attacker.call(addr, &format!("a{i}")).await;
        assert!(raw.status.is_success(), "{}: {}", raw.status, raw.body);
    }
    // ...after which its own new assertions are refused, with the reason.
    let raw = attacker.call(addr, "a-more").await;
    assert_eq!(raw.status, http::StatusCode::FORBIDDEN, "{}", raw.body);
    let error = raw.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        error.contains(r#"replay cache share of issuer "chaperone:agent:shop/attacker" is full"#),
        "{error}"
    );
    // The other peer is not affected.
    for i in 0..SHARE {
        let raw = victim.call(addr, &format!("v{i}")).await;
        assert!(raw.status.is_success(), "{}: {}", raw.status, raw.body);
        assert!(raw.json().get("result").is_some(), "{}", raw.body);
    }
    // And replays are still caught for both.
    let replayed = attacker.call(addr, "a0").await;
    assert_eq!(replayed.status, http::StatusCode::FORBIDDEN);
    let replayed = victim.call(addr, "v0").await;
    assert_eq!(replayed.status, http::StatusCode::FORBIDDEN);
    assert!(
        replayed.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{}",
        replayed.body
    );
    assert_eq!(tool.seen.lock().unwrap().len(), 2 * SHARE);
}

/// An audit output whose every write fails, as a closed pipe's does.
struct BrokenPipe;

impl std::io::Write for BrokenPipe {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::BrokenPipe.into())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_call_whose_record_cannot_be_written_is_never_forwarded() {
    let harness = Harness::start_with_output(
        true,
        true,
        Settings::default(),
        AuditOutput::Writer(Box::new(BrokenPipe)),
        AuditBuffer::default(),
    )
    .await;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_order","arguments":{"id":"o-1"}}}"#;
    // The record is appended, the writer thread fails to write it, and the
    // call waiting for it before forwarding is refused.
    let first = post_raw(&harness.url(), &[], body).await;
    assert_eq!(first.status, 503, "{}", first.body);
    assert!(
        first.body.contains("audit log is unavailable"),
        "{}",
        first.body
    );
    // From then on every call is refused as it is decided.
    let second = post_raw(&harness.url(), &[], body).await;
    assert_eq!(second.status, 503, "{}", second.body);
    assert_eq!(
        harness.upstream.seen.lock().unwrap().len(),
        0,
        "no call reached the tool server"
    );
}
