//! One conformance suite for every `Broker`: the same cases run against NATS
//! JetStream (a real nats-server) and the embedded broker. A behaviour that
//! differs is a bug in one of them or a documented limit of `embedded`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_api::subscription::StartPosition;
use ferry_api::{consumer_plan, stream_plan, ConsumerPlan, Duration as D, SubscriptionSpec, TopicSpec};
use ferry_e2e::NatsServer;
use ferry_sidecar::broker::embedded::EmbeddedBroker;
use ferry_sidecar::broker::nats::NatsBroker;
use ferry_sidecar::broker::{Broker, BrokerError, Consumer, Fetched, OutMessage, Settlement};
use ferry_sidecar::config::BrokerConfig;

struct Harness {
    broker: Arc<dyn Broker>,
    nats: Option<NatsServer>,
    dir: tempfile::TempDir,
}

impl Harness {
    async fn nats() -> Harness {
        let nats = NatsServer::start();
        let broker = NatsBroker::connect(&BrokerConfig { urls: vec![nats.url()], ..Default::default() }, "conformance")
            .await
            .unwrap();
        let h = Harness { broker: Arc::new(broker), nats: Some(nats), dir: tempfile::tempdir().unwrap() };
        h.wait_connected().await;
        h
    }

    async fn embedded() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let broker = EmbeddedBroker::open(&dir.path().join("broker")).unwrap();
        Harness { broker: Arc::new(broker), nats: None, dir }
    }

    async fn wait_connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        // The client reports its state only by polling.
        while !self.broker.is_connected() {
            assert!(Instant::now() < deadline, "never connected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Restarts the broker with its state: the server process, or a reopen
    /// of the embedded broker's directory.
    async fn restart(&mut self) {
        match &mut self.nats {
            Some(n) => {
                // Gracefully: with its default sync_interval a killed
                // nats-server loses recent acks (DESIGN.md §6).
                n.stop_gracefully();
                n.start_again();
                self.wait_connected().await;
            }
            None => {
                self.broker = Arc::new(EmbeddedBroker::open(&self.dir.path().join("broker")).unwrap());
            }
        }
    }

    async fn setup(&self, ack_wait: Duration) -> ConsumerPlan {
        self.broker.ensure_stream(&stream_plan("conf", "orders", &TopicSpec::default())).await.unwrap();
        let mut spec = SubscriptionSpec::new("orders", "app");
        spec.processing_timeout = D(ack_wait);
        spec.start_position = StartPosition::Earliest;
        let plan = consumer_plan("conf", "group", &spec, None);
        self.broker.ensure_consumer(&plan).await.unwrap();
        plan
    }

    async fn consumer(&self, plan: &ConsumerPlan) -> Arc<dyn Consumer> {
        self.broker.consumer(plan).await.unwrap()
    }

    async fn publish(&self, id: &str) -> (u64, bool) {
        let msg = OutMessage {
            subject: "ferry.conf.orders.0".into(),
            id: id.into(),
            headers: vec![("content-type".into(), "text/plain".into())],
            payload: Bytes::from(format!("body-{id}")),
        };
        let ack = self.broker.publish(msg).await.unwrap().await.unwrap();
        (ack.sequence, ack.duplicate)
    }
}

fn ids(msgs: &[Fetched]) -> Vec<String> {
    msgs.iter().map(|m| m.id.clone()).collect()
}

/// Fetches until `n` messages came or `wait` passed.
async fn fetch_n(c: &Arc<dyn Consumer>, n: usize, wait: Duration) -> Vec<Fetched> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        out.extend(c.fetch(n - out.len(), left).await.unwrap());
    }
    out
}

async fn publish_keeps_order_and_drops_a_repeated_id(h: Harness) {
    let plan = h.setup(Duration::from_secs(5)).await;
    assert_eq!(h.publish("a").await, (1, false));
    assert_eq!(h.publish("b").await, (2, false));
    assert_eq!(h.publish("c").await, (3, false));
    assert_eq!(h.publish("a").await, (1, true), "a repeated id is a duplicate of the original");
    let c = h.consumer(&plan).await;
    let got = fetch_n(&c, 3, Duration::from_secs(5)).await;
    assert_eq!(ids(&got), ["a", "b", "c"]);
    assert_eq!(got.iter().map(|m| m.sequence).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(got.iter().all(|m| m.delivered == 1));
    assert_eq!(&got[1].payload[..], b"body-b");
    assert_eq!(got[1].header("content-type"), Some("text/plain"));
    assert_eq!(got[1].subject, "ferry.conf.orders.0");
    for m in &got {
        m.settle.settle(Settlement::Ack).await.unwrap();
    }
    assert!(c.fetch(10, Duration::from_millis(300)).await.unwrap().is_empty(), "all acked");
}

async fn ack_and_term_are_final_and_a_delayed_retry_waits_its_delay(h: Harness) {
    let plan = h.setup(Duration::from_secs(5)).await;
    for id in ["x", "y", "z"] {
        h.publish(id).await;
    }
    let c = h.consumer(&plan).await;
    let got = fetch_n(&c, 3, Duration::from_secs(5)).await;
    got[0].settle.settle(Settlement::Ack).await.unwrap();
    got[1].settle.settle(Settlement::Reject).await.unwrap();
    let retried_at = Instant::now();
    got[2].settle.settle(Settlement::Retry(Duration::from_millis(800))).await.unwrap();
    assert!(c.fetch(10, Duration::from_millis(300)).await.unwrap().is_empty(), "no redelivery before the delay");
    let again = fetch_n(&c, 1, Duration::from_secs(5)).await;
    assert_eq!(ids(&again), ["z"]);
    assert_eq!(again[0].delivered, 2);
    assert!(retried_at.elapsed() >= Duration::from_millis(800));
    again[0].settle.settle(Settlement::Ack).await.unwrap();
    assert!(c.fetch(10, Duration::from_millis(300)).await.unwrap().is_empty());
}

async fn an_unsettled_message_is_redelivered_after_the_ack_wait_and_progress_extends_it(h: Harness) {
    let plan = h.setup(Duration::from_millis(700)).await;
    h.publish("slow").await;
    let c = h.consumer(&plan).await;
    let first = fetch_n(&c, 1, Duration::from_secs(5)).await;
    let fetched_at = Instant::now();
    // Keep it leased for about twice the ack wait.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        first[0].settle.settle(Settlement::Progress).await.unwrap();
    }
    assert!(
        c.fetch(1, Duration::ZERO.max(Duration::from_millis(50))).await.unwrap().is_empty(),
        "progress kept the lease"
    );
    let again = fetch_n(&c, 1, Duration::from_secs(5)).await;
    assert_eq!(ids(&again), ["slow"]);
    assert_eq!(again[0].delivered, 2);
    assert!(
        fetched_at.elapsed() >= Duration::from_millis(1200 + 600),
        "redelivered only after the extended lease lapsed"
    );
    again[0].settle.settle(Settlement::Release).await.unwrap();
    let third = fetch_n(&c, 1, Duration::from_secs(2)).await;
    assert_eq!(third[0].delivered, 3, "released: delivered again at once");
    third[0].settle.settle(Settlement::Ack).await.unwrap();
}

async fn two_consumers_of_one_group_share_the_messages_each_once(h: Harness) {
    let plan = h.setup(Duration::from_secs(5)).await;
    for i in 0..40 {
        h.publish(&format!("m{i}")).await;
    }
    let (a, b) = (h.consumer(&plan).await, h.consumer(&plan).await);
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while got_a.len() + got_b.len() < 40 && Instant::now() < deadline {
        let (ra, rb) = tokio::join!(a.fetch(7, Duration::from_millis(200)), b.fetch(7, Duration::from_millis(200)));
        for m in ra.unwrap() {
            m.settle.settle(Settlement::Ack).await.unwrap();
            got_a.push(m.id);
        }
        for m in rb.unwrap() {
            m.settle.settle(Settlement::Ack).await.unwrap();
            got_b.push(m.id);
        }
    }
    let mut all: Vec<String> = got_a.iter().chain(&got_b).cloned().collect();
    all.sort();
    let mut want: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    want.sort();
    assert_eq!(all, want, "each message exactly once across the group");
    assert!(!got_a.is_empty() && !got_b.is_empty(), "both members got work: {} / {}", got_a.len(), got_b.len());
}

async fn state_survives_a_broker_restart(mut h: Harness) {
    let plan = h.setup(Duration::from_secs(3)).await;
    for id in ["r1", "r2", "r3"] {
        h.publish(id).await;
    }
    {
        let c = h.consumer(&plan).await;
        let got = fetch_n(&c, 3, Duration::from_secs(5)).await;
        got[0].settle.settle(Settlement::Ack).await.unwrap();
        got[2].settle.settle(Settlement::Ack).await.unwrap();
        // r2 stays unsettled. A settle returns once sent; wait until the
        // broker applied both acks before stopping it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.leased().await.unwrap() != 1 {
            assert!(Instant::now() < deadline, "the broker never applied the acks");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    h.restart().await;
    // A publish of a seen id is still a duplicate after the restart.
    assert_eq!(h.publish("r1").await, (1, true));
    h.publish("r4").await;
    let c = h.consumer(&plan).await;
    // NATS redelivers r2 after its ack wait, embedded at once after a restart.
    let got = fetch_n(&c, 2, Duration::from_secs(20)).await;
    let mut got_ids = ids(&got);
    got_ids.sort();
    assert_eq!(got_ids, ["r2", "r4"], "acked ones are not redelivered, unacked ones are");
    let r2 = got.iter().find(|m| m.id == "r2").unwrap();
    assert_eq!(r2.delivered, 2, "the delivery count survived");
}

/// A message handed back before the app got it is no attempt: its next
/// delivery has the count it had (JetStream counts every delivery; the
/// nats backend notes such hand-backs in the returns bucket). Also when
/// another consumer handle, as another sidecar of the group would, and
/// after a broker restart.
async fn a_message_handed_back_unpushed_keeps_its_attempt_count(mut h: Harness) {
    let plan = h.setup(Duration::from_secs(5)).await;
    h.publish("waits").await;
    let c = h.consumer(&plan).await;
    let first = fetch_n(&c, 1, Duration::from_secs(5)).await;
    assert_eq!((ids(&first), first[0].delivered), (vec!["waits".to_owned()], 1));
    first[0].settle.settle(Settlement::ReleaseUnpushed).await.unwrap();
    let second = fetch_n(&c, 1, Duration::from_secs(5)).await;
    assert_eq!((ids(&second), second[0].delivered), (vec!["waits".to_owned()], 1), "handed back unpushed: no attempt");
    second[0].settle.settle(Settlement::Release).await.unwrap();
    let third = fetch_n(&c, 1, Duration::from_secs(5)).await;
    assert_eq!(third[0].delivered, 2, "released after it was pushed: an attempt");
    third[0].settle.settle(Settlement::ReleaseUnpushed).await.unwrap();
    let other = h.consumer(&plan).await;
    let fourth = fetch_n(&other, 1, Duration::from_secs(5)).await;
    assert_eq!(fourth[0].delivered, 2, "another sidecar of the group sees the same count");
    fourth[0].settle.settle(Settlement::ReleaseUnpushed).await.unwrap();
    // A span of time, not a wait for an event: nats-server reports a
    // durable consumer's creation time anew after a restart, and notes
    // keyed by it (to the second) were lost when the restart fell in
    // another second than the consumer's creation. Here it always does.
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.restart().await;
    let c = h.consumer(&plan).await;
    let fifth = fetch_n(&c, 1, Duration::from_secs(5)).await;
    assert_eq!((ids(&fifth), fifth[0].delivered), (vec!["waits".to_owned()], 2), "and after a broker restart");
    fifth[0].settle.settle(Settlement::Ack).await.unwrap();
}

/// A consumer's start position cannot change: asked for with another one,
/// it is refused (JetStream's rule; the embedded broker kept the old state
/// silently), also after a restart; the same plan still opens it.
async fn a_consumer_asked_for_with_another_start_position_is_refused(mut h: Harness) {
    let plan = h.setup(Duration::from_secs(5)).await; // Earliest
    let latest = ConsumerPlan { start: StartPosition::Latest, ..plan.clone() };
    for round in ["running", "after a restart"] {
        match h.broker.ensure_consumer(&latest).await {
            Err(BrokerError::Refused(_)) => {}
            other => panic!("{round}: {other:?}"),
        }
        assert!(h.broker.consumer(&latest).await.is_err(), "{round}");
        h.broker.ensure_consumer(&plan).await.unwrap_or_else(|e| panic!("{round}: {e}"));
        h.restart().await;
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Harness::nats().await).await
                }
            )*
        }
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Harness::embedded().await).await
                }
            )*
        }
    };
}

conformance!(
    publish_keeps_order_and_drops_a_repeated_id,
    ack_and_term_are_final_and_a_delayed_retry_waits_its_delay,
    an_unsettled_message_is_redelivered_after_the_ack_wait_and_progress_extends_it,
    two_consumers_of_one_group_share_the_messages_each_once,
    state_survives_a_broker_restart,
    a_message_handed_back_unpushed_keeps_its_attempt_count,
    a_consumer_asked_for_with_another_start_position_is_refused,
);

/// NATS only (the embedded broker un-counts a hand-back in its own state):
/// a message's note in the returns bucket is deleted once it is acked, and
/// a note left for a message of a stream since made again under the same
/// name (sequences start over) does not lower the new message's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_returns_notes_are_deleted_on_ack_and_void_for_another_message_at_their_sequence() {
    let h = Harness::nats().await;
    let url = h.nats.as_ref().unwrap().url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let plan = h.setup(Duration::from_secs(5)).await;
    h.publish("old").await;
    let c = h.consumer(&plan).await;
    let first = fetch_n(&c, 1, Duration::from_secs(5)).await;
    first[0].settle.settle(Settlement::ReleaseUnpushed).await.unwrap();
    let kv = js.get_key_value(ferry_api::naming::RETURNS_BUCKET).await.unwrap();
    let key = ferry_api::naming::returns_key(&plan.stream, &plan.name, 1);
    let noted = kv.get(&key).await.unwrap().expect("the hand-back is noted");
    let second = fetch_n(&c, 1, Duration::from_secs(5)).await;
    assert_eq!(second[0].delivered, 1, "handed back unpushed: no attempt");
    second[0].settle.settle(Settlement::Ack).await.unwrap();
    assert_eq!(kv.get(&key).await.unwrap(), None, "acked: its note is gone");

    // The same note left behind (a consumer deleted with the message
    // unsettled), then the stream made again: its sequence 1 is another
    // message, stored at another time.
    kv.put(&key, noted).await.unwrap();
    js.delete_stream(&plan.stream).await.unwrap();
    let plan = h.setup(Duration::from_secs(5)).await;
    assert_eq!(h.publish("new").await, (1, false));
    let c = h.consumer(&plan).await;
    let first = fetch_n(&c, 1, Duration::from_secs(5)).await;
    assert_eq!((ids(&first), first[0].delivered), (vec!["new".to_owned()], 1));
    first[0].settle.settle(Settlement::Release).await.unwrap();
    let second = fetch_n(&c, 1, Duration::from_secs(5)).await;
    assert_eq!(second[0].delivered, 2, "pushed, handed back: an attempt, whatever the old note says");
    second[0].settle.settle(Settlement::Ack).await.unwrap();
}

/// NATS only (the embedded broker never removes a consumer by itself): a
/// per-pod consumer kept in use by keep-alives outlives its idle limit and
/// gets no message from them; left alone, the broker removes it, and a
/// keep-alive for it then fails (the runner makes it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_keep_alive_keeps_an_idle_consumer_without_taking_a_message() {
    let h = Harness::nats().await;
    let js = async_nats::jetstream::new(async_nats::connect(&h.nats.as_ref().unwrap().url()).await.unwrap());
    h.broker.ensure_stream(&stream_plan("conf", "orders", &TopicSpec::default())).await.unwrap();
    let mut spec = SubscriptionSpec::new("orders", "app");
    spec.start_position = StartPosition::Earliest;
    spec.fanout = ferry_api::subscription::Fanout::Pod;
    let idle = Duration::from_secs(2);
    let plan = ferry_sidecar::deliver::consumer_plan("conf", "cache", &spec, "pod-a", idle);
    assert_eq!(plan.inactive_threshold, Some(idle));
    h.broker.ensure_consumer(&plan).await.unwrap();
    h.publish("kept").await;
    let c = h.consumer(&plan).await;
    let info = || async { js.get_stream(&plan.stream).await.unwrap().consumer_info(&plan.name).await };
    // Time-based: keep-alives every 200 ms for two idle limits.
    let until = Instant::now() + 2 * idle;
    while Instant::now() < until {
        c.keep_alive().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept = info().await.expect("kept past its idle limit");
    assert_eq!((kept.delivered.stream_sequence, kept.num_ack_pending), (0, 0), "no keep-alive took the message");
    let got = fetch_n(&c, 1, Duration::from_secs(5)).await;
    assert_eq!((ids(&got), got[0].delivered), (vec!["kept".to_owned()], 1));
    got[0].settle.settle(Settlement::Ack).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    while info().await.is_ok() {
        assert!(Instant::now() < deadline, "never removed once left idle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c.keep_alive().await.is_err(), "the keep-alive of a removed consumer fails");
}

/// The embedded broker forgets an id once its duplicate window passed, in
/// memory and after a reopen (its window is rebuilt from the log); within
/// the window a repeat is a duplicate of the stored sequence. `u`, stored
/// 0.6 s after `w`, most likely shares `w`'s table (a table spans 1 s here)
/// and keeps it alive past `w`'s window: `w` must still count as new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_window_forgets_an_id_after_the_window_also_after_a_reopen() {
    let mut h = Harness::embedded().await;
    let spec = TopicSpec { duplicate_window: D(Duration::from_secs(2)), ..TopicSpec::default() };
    h.broker.ensure_stream(&stream_plan("conf", "orders", &spec)).await.unwrap();
    let first = Instant::now();
    assert_eq!(h.publish("w").await, (1, false));
    assert_eq!(h.publish("v").await, (2, false));
    assert_eq!(h.publish("w").await, (1, true));
    h.restart().await;
    assert_eq!(h.publish("v").await, (2, true), "the window was rebuilt from the log");
    // Waiting for time-based behaviour, not synchronising: the window must
    // pass for `w` and `v`, not for `u`. Checked below by the sequences.
    tokio::time::sleep_until((first + Duration::from_millis(600)).into()).await;
    assert_eq!(h.publish("u").await, (3, false));
    tokio::time::sleep_until((first + Duration::from_millis(2100)).into()).await;
    assert_eq!(h.publish("w").await, (4, false), "an id past its window is stored again");
    assert_eq!(h.publish("w").await, (4, true));
    assert_eq!(h.publish("u").await, (3, true), "an id inside its window is still a duplicate");
    h.restart().await;
    assert_eq!(h.publish("v").await, (5, false), "a reopen does not bring back an id past its window");
}
