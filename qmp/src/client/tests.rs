//! The client against a scripted peer over an in-memory pipe: handshake, id matching, concurrency,
//! error replies, and every way a connection can end. No QEMU needed.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{
    AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines, ReadHalf, WriteHalf,
};

use super::*;
use crate::Timestamp;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "test"}, "capabilities": ["oob"]}}"#;

/// The QEMU side of the pipe, driven by the test.
struct Peer {
    lines: Lines<BufReader<ReadHalf<DuplexStream>>>,
    write: WriteHalf<DuplexStream>,
}

impl Peer {
    async fn recv(&mut self) -> Value {
        let line = self
            .lines
            .next_line()
            .await
            .expect("read from client")
            .expect("client closed");
        serde_json::from_str(&line).expect("client sent JSON")
    }

    async fn send_line(&mut self, line: &str) {
        self.write
            .write_all(line.as_bytes())
            .await
            .expect("write to client");
        self.write.write_all(b"\n").await.expect("write to client");
    }

    async fn send(&mut self, value: Value) {
        self.send_line(&value.to_string()).await;
    }

    async fn reply(&mut self, id: &Value, ret: Value) {
        self.send(json!({"return": ret, "id": id})).await;
    }

    async fn event(&mut self, name: &str, seconds: i64) {
        self.send(json!({"event": name, "timestamp": {"seconds": seconds, "microseconds": 5}}))
            .await;
    }
}

async fn connect_with_limit(limit: usize) -> (Qmp, Peer) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (read, write) = tokio::io::split(server);
    let mut peer = Peer {
        lines: BufReader::new(read).lines(),
        write,
    };
    let (cr, cw) = tokio::io::split(client);
    let deadline = Instant::now() + Duration::from_secs(5);
    let handshake = Qmp::handshake(cr, cw, "test".into(), None, deadline, limit);
    let script = async {
        peer.send_line(GREETING).await;
        let caps = peer.recv().await;
        assert_eq!(caps["execute"], "qmp_capabilities");
        assert!(
            caps.get("arguments").is_none(),
            "no arguments for qmp_capabilities: {caps}"
        );
        peer.reply(&caps["id"], json!({})).await;
    };
    let (qmp, ()) = tokio::join!(handshake, script);
    (qmp.expect("handshake"), peer)
}

async fn connect() -> (Qmp, Peer) {
    connect_with_limit(MAX_LINE).await
}

#[tokio::test]
async fn handshake_reads_the_version() {
    let (qmp, _peer) = connect().await;
    assert_eq!(qmp.version(), QemuVersion::new(10, 0, 2));
    assert_eq!(qmp.package(), "test");
    assert_eq!(qmp.peer_pid(), None);
    assert!(!qmp.is_closed());
}

#[tokio::test]
async fn typed_command_is_encoded_and_its_reply_decoded() {
    let (qmp, mut peer) = connect().await;
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute(qapi::qmp::query_status {}).await }
    });
    let req = peer.recv().await;
    assert_eq!(req["execute"], "query-status");
    assert_eq!(req["arguments"], json!({}));
    peer.reply(
        &req["id"],
        json!({"status": "paused", "running": false, "singlestep": false}),
    )
    .await;
    let status = call.await.expect("task").expect("typed reply");
    assert!(!status.running);
    assert!(matches!(status.status, qapi::qmp::RunState::paused));
}

#[tokio::test]
async fn replies_in_any_order_reach_their_own_callers() {
    let (qmp, mut peer) = connect().await;
    let mut calls = Vec::new();
    for i in 0..200 {
        let qmp = qmp.clone();
        calls.push(tokio::spawn(async move {
            (
                i,
                qmp.execute_raw(&format!("cmd-{i}"), json!({"n": i})).await,
            )
        }));
    }
    let mut requests = Vec::new();
    for _ in 0..200 {
        requests.push(peer.recv().await);
    }
    let mut ids: Vec<u64> = requests
        .iter()
        .map(|r| r["id"].as_u64().expect("numeric id"))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200, "ids must be unique on a connection");
    // Answer backwards, each reply naming the request it answers.
    for req in requests.iter().rev() {
        peer.reply(
            &req["id"],
            json!({"echo": req["execute"], "n": req["arguments"]["n"]}),
        )
        .await;
    }
    for call in calls {
        let (i, reply) = call.await.expect("task");
        assert_eq!(
            reply.expect("reply"),
            json!({"echo": format!("cmd-{i}"), "n": i})
        );
    }
}

#[tokio::test]
async fn error_reply_is_typed_with_class_and_desc() {
    let (qmp, mut peer) = connect().await;
    let call = tokio::spawn(async move { qmp.execute_raw("foo", Value::Null).await });
    let req = peer.recv().await;
    assert!(
        req.get("arguments").is_none(),
        "Null means no arguments member: {req}"
    );
    peer.send(json!({"id": req["id"], "error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}}))
        .await;
    let err = call.await.expect("task").expect_err("error reply");
    assert_eq!(err.class(), Some("CommandNotFound"));
    assert_eq!(
        err.to_string(),
        "CommandNotFound: The command foo has not been found"
    );
    assert!(matches!(err, Error::Qmp { ref command, .. } if command == "foo"));
}

#[tokio::test]
async fn reply_not_matching_the_typed_schema_is_a_decode_error() {
    let (qmp, mut peer) = connect().await;
    let call = tokio::spawn(async move { qmp.execute(qapi::qmp::query_version {}).await });
    let req = peer.recv().await;
    peer.reply(&req["id"], json!({"qemu": "ten"})).await;
    let err = call.await.expect("task").expect_err("decode error");
    assert!(
        matches!(err, Error::Decode { ref command, .. } if command == "query-version"),
        "{err:?}"
    );
}

#[tokio::test]
async fn non_object_arguments_are_refused_before_sending() {
    let (qmp, _peer) = connect().await;
    let err = qmp
        .execute_raw("query-status", json!([1]))
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::BadArguments { .. }), "{err:?}");
}

#[tokio::test]
async fn events_carry_name_data_timestamp_and_precede_the_reply() {
    let (qmp, mut peer) = connect().await;
    let mut events = qmp.events();
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute(qapi::qmp::stop {}).await }
    });
    let req = peer.recv().await;
    peer.event("STOP", 1_700_000_000).await;
    peer.reply(&req["id"], json!({})).await;
    call.await.expect("task").expect("stop");
    // The event was published before the reply was handed over: it is already there.
    let ev = tokio::time::timeout(Duration::from_millis(1), events.next())
        .await
        .expect("already queued")
        .expect("event");
    assert_eq!(ev.name, "STOP");
    assert_eq!(ev.data, json!({}));
    assert_eq!(
        ev.timestamp,
        Timestamp {
            seconds: 1_700_000_000,
            microseconds: 5
        }
    );
    assert_eq!(
        serde_json::to_string(&ev).expect("serialize"),
        r#"{"event":"STOP","data":{},"timestamp":{"seconds":1700000000,"microseconds":5}}"#
    );
}

#[tokio::test]
async fn wait_for_skips_other_events_and_times_out() {
    let (qmp, mut peer) = connect().await;
    let mut events = qmp.events();
    peer.event("RESUME", 1).await;
    peer.event("STOP", 2).await;
    let ev = events
        .wait_for(|e| e.name == "STOP", Duration::from_secs(2))
        .await
        .expect("STOP");
    assert_eq!(ev.timestamp.seconds, 2);
    let started = std::time::Instant::now();
    let err = events
        .wait_for(|e| e.name == "STOP", Duration::from_millis(100))
        .await
        .expect_err("no event");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn slow_subscriber_learns_how_many_events_it_missed() {
    let (qmp, mut peer) = connect().await;
    let mut events = qmp.events();
    let total = EVENT_CAPACITY as i64 + 10;
    for i in 0..total {
        peer.event("X", i).await;
    }
    // A round trip guarantees the reader task has published everything before it.
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute_raw("sync", Value::Null).await }
    });
    let req = peer.recv().await;
    peer.reply(&req["id"], json!({})).await;
    call.await.expect("task").expect("sync");
    let err = events.next().await.expect_err("lagged");
    assert!(matches!(err, Error::EventsLagged { missed: 10 }), "{err:?}");
    // The subscription goes on with the oldest event still held.
    assert_eq!(events.next().await.expect("event").timestamp.seconds, 10);
}

#[tokio::test]
async fn peer_closing_fails_pending_calls_and_ends_subscriptions() {
    let (qmp, mut peer) = connect().await;
    let mut events = qmp.events();
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute_raw("query-status", Value::Null).await }
    });
    let _req = peer.recv().await;
    peer.write
        .write_all(br#"{"return": {"stat"#)
        .await
        .expect("write");
    drop(peer);
    let err = call.await.expect("task").expect_err("disconnected");
    assert!(matches!(err, Error::Disconnected), "{err:?}");
    assert!(matches!(events.next().await, Err(Error::Disconnected)));
    assert!(qmp.is_closed());
    assert_eq!(qmp.close_reason(), Some(CloseReason::EofMidLine));
    // Calls after the close fail at once, and so do new subscriptions.
    assert!(matches!(
        qmp.execute_raw("x", Value::Null).await,
        Err(Error::Disconnected)
    ));
    assert!(matches!(
        qmp.events().next().await,
        Err(Error::Disconnected)
    ));
}

#[tokio::test]
async fn malformed_line_ends_the_connection_with_its_reason() {
    let (qmp, mut peer) = connect().await;
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute_raw("query-status", Value::Null).await }
    });
    let _req = peer.recv().await;
    peer.send_line("this is not json").await;
    assert!(matches!(
        call.await.expect("task"),
        Err(Error::Disconnected)
    ));
    match qmp.close_reason() {
        Some(CloseReason::Malformed { detail }) => assert!(detail.contains("not JSON"), "{detail}"),
        other => panic!("wrong reason {other:?}"),
    }
}

#[tokio::test]
async fn line_over_the_cap_ends_the_connection() {
    let (qmp, mut peer) = connect_with_limit(4096).await;
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute_raw("query-status", Value::Null).await }
    });
    let req = peer.recv().await;
    let huge = json!({"return": "x".repeat(10_000), "id": req["id"]});
    peer.send(huge).await;
    assert!(matches!(
        call.await.expect("task"),
        Err(Error::Disconnected)
    ));
    assert_eq!(
        qmp.close_reason(),
        Some(CloseReason::LineTooLong { limit: 4096 })
    );
}

#[tokio::test]
async fn abandoned_call_is_forgotten_and_its_late_reply_ignored() {
    let (qmp, mut peer) = connect().await;
    let slow = tokio::time::timeout(
        Duration::from_millis(50),
        qmp.execute_raw("slow", Value::Null),
    )
    .await;
    assert!(slow.is_err(), "no reply was sent, the call must time out");
    assert!(
        qmp.inner.shared.lock().pending.is_empty(),
        "abandoned call left in the map"
    );
    let slow_req = peer.recv().await;
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute_raw("next", Value::Null).await }
    });
    let next_req = peer.recv().await;
    peer.reply(&slow_req["id"], json!("late")).await;
    peer.reply(&next_req["id"], json!("mine")).await;
    assert_eq!(call.await.expect("task").expect("reply"), json!("mine"));
}

#[tokio::test]
async fn dropping_every_handle_closes_the_socket_and_ends_subscriptions() {
    let (qmp, mut peer) = connect().await;
    let mut events = qmp.events();
    drop(qmp);
    assert!(matches!(events.next().await, Err(Error::Disconnected)));
    let eof = tokio::time::timeout(Duration::from_secs(1), peer.lines.next_line())
        .await
        .expect("EOF in time");
    assert!(matches!(eof, Ok(None)), "peer must see EOF: {eof:?}");
}

#[tokio::test]
async fn greeting_problems_are_not_qmp_errors() {
    async fn greet_with(bytes: &'static [u8], close: bool) -> Error {
        let (client, mut server) = tokio::io::duplex(1024);
        let (cr, cw) = tokio::io::split(client);
        let deadline = Instant::now() + Duration::from_millis(300);
        let peer = async move {
            // The client may hang up before it has read everything (a line over the cap):
            // a broken pipe here is the client doing its job.
            let _ = server.write_all(bytes).await;
            if !close {
                // Keep the pipe open past the deadline.
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        };
        let handshake = Qmp::handshake(cr, cw, "test".into(), None, deadline, 1024);
        let (res, ()) = tokio::join!(handshake, peer);
        res.expect_err("handshake must fail")
    }
    let e = greet_with(b"garbage\n", true).await;
    assert!(
        matches!(e, Error::NotQmp { ref detail } if detail.contains("not JSON")),
        "{e:?}"
    );
    let e = greet_with(b"{\"QMP\": {}}\n", true).await;
    assert!(matches!(e, Error::NotQmp { .. }), "{e:?}");
    let e = greet_with(b"", true).await;
    assert!(
        matches!(e, Error::NotQmp { ref detail } if detail.contains("without a greeting")),
        "{e:?}"
    );
    let e = greet_with(b"{\"QMP\"", true).await;
    assert!(
        matches!(e, Error::NotQmp { ref detail } if detail.contains("middle")),
        "{e:?}"
    );
    let e = greet_with(b"", false).await;
    assert!(
        matches!(e, Error::Timeout { ref what, .. } if what.contains("greeting")),
        "{e:?}"
    );
    let e = greet_with(&[b'x'; 2000], false).await;
    assert!(matches!(e, Error::LineTooLong { limit: 1024 }), "{e:?}");
}

#[tokio::test]
async fn a_bounded_handle_gives_up_on_a_qemu_that_does_not_answer() {
    let (qmp, mut peer) = connect().await;
    let bounded = qmp.with_reply_timeout(Some(Duration::from_millis(50)));
    assert_eq!(bounded.reply_timeout(), Some(Duration::from_millis(50)));
    assert_eq!(
        qmp.reply_timeout(),
        None,
        "the original handle keeps no bound"
    );
    let err = bounded
        .execute_raw("query-migrate", Value::Null)
        .await
        .expect_err("no reply was sent");
    assert!(
        matches!(err, Error::Timeout { ref what, .. } if what.contains("query-migrate")),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("QEMU's reply to query-migrate"),
        "{err}"
    );
    // The connection stays usable: the late reply is dropped, the next call gets its own.
    let stuck = peer.recv().await;
    let call = tokio::spawn({
        let bounded = bounded.clone();
        async move { bounded.execute_raw("query-status", Value::Null).await }
    });
    let next = peer.recv().await;
    peer.reply(&stuck["id"], json!("late")).await;
    peer.reply(&next["id"], json!({"running": true})).await;
    assert_eq!(
        call.await.expect("task").expect("reply"),
        json!({"running": true})
    );
}
