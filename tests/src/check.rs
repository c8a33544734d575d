//! The checker of the fault scenarios: compares what producers were
//! acknowledged (2xx answers only) with what the test app received, and
//! says what was lost, delivered twice, delivered out of order per key, or
//! dead-lettered, in one summary line per scenario.
//!
//! Definitions (by message id, the app's `ce-id`):
//! - *delivered*: an acknowledged id with at least one successful delivery
//!   (one the scenario's `success` predicate accepts: the app answered it
//!   2xx in time, or acked it by callback).
//! - *lost*: an acknowledged id neither delivered nor dead-lettered.
//! - *duplicate*: an id the app accepted more than once. A repeat of a
//!   delivery the app accepted within [`Checker::crash_window`] before a
//!   recorded crash (`kill -9`) of the sidecar that pushed it is counted
//!   apart, as `acked_at_crash`: the app answered, but the sidecar died
//!   before it could record the ack, so at-least-once delivery must repeat
//!   it. A request the dead sidecar sent can reach the app's handler just
//!   after the kill (it sat in the socket); such a delivery counts as
//!   before the crash when its `ferry-delivery-id` (a UUIDv7, stamped by
//!   the sidecar when it sends) is no later than the crash's wall-clock
//!   millisecond. Every other repeat is a duplicate.
//! - *out of order*: a message whose first successful delivery came after
//!   that of a message of the same key acknowledged after it (the producer
//!   sends the messages of one key one after the other, so acknowledgement
//!   order is the key's order). Each late message counts once.
//! - *unknown*: an id the app accepted that no producer was acknowledged for
//!   (allowed only for produce calls whose answer was lost).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::app::Received;

/// How long before a crash an accepted delivery may still be unrecorded by
/// the sidecar that pushed it (default of [`Checker::crash_window`]).
pub const DEFAULT_CRASH_WINDOW: Duration = Duration::from_millis(500);

/// One acknowledged produce.
#[derive(Debug, Clone)]
struct Acked {
    id: String,
    key: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    acked: Vec<Acked>,
    acked_ids: HashSet<String>,
    crashes: Vec<Crash>,
    dead: BTreeMap<String, usize>,
}

/// A recorded `kill -9`: when, by the test's clock and by the wall clock
/// (to compare with the sidecar's delivery-id stamps).
#[derive(Debug, Clone, Copy)]
struct Crash {
    at: Instant,
    wall_ms: u64,
}

/// The millisecond a UUIDv7 `ferry-delivery-id` was stamped with, if it is one.
fn sent_ms(r: &Received) -> Option<u64> {
    let id = uuid::Uuid::parse_str(r.delivery_id()).ok()?;
    if id.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    Some(secs * 1000 + u64::from(nanos) / 1_000_000)
}

/// Collects acknowledged produces, crashes and dead letters of one scenario.
#[derive(Debug)]
pub struct Checker {
    scenario: String,
    crash_window: Duration,
    state: Mutex<State>,
}

impl Checker {
    /// A checker for the scenario named `scenario` (the summary's first field).
    pub fn new(scenario: &str) -> Checker {
        Checker {
            scenario: scenario.to_owned(),
            crash_window: DEFAULT_CRASH_WINDOW,
            state: Mutex::new(State::default()),
        }
    }

    /// Sets how long before a crash an accepted delivery counts as possibly
    /// unrecorded (add the app's answer delay to the default).
    pub fn crash_window(mut self, window: Duration) -> Checker {
        self.crash_window = window;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a produce the sidecar answered 2xx for. Call it in the order
    /// the answers came, per key (the checker's order for that key).
    /// Recording an id again (a retried produce) is ignored.
    pub fn acked(&self, id: &str, key: Option<&str>) {
        let mut s = self.lock();
        if s.acked_ids.insert(id.to_owned()) {
            s.acked.push(Acked { id: id.to_owned(), key: key.map(str::to_owned) });
        }
    }

    /// Records that a sidecar was killed (`kill -9`) just now.
    pub fn crash(&self) {
        let wall_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.lock().crashes.push(Crash { at: Instant::now(), wall_ms });
    }

    /// Records a dead letter for `id` (it counts as settled, not lost).
    pub fn dead_lettered(&self, id: &str) {
        *self.lock().dead.entry(id.to_owned()).or_insert(0) += 1;
    }

    /// How many produces were acknowledged so far.
    pub fn acked_count(&self) -> usize {
        self.lock().acked.len()
    }

    /// The acknowledged ids, in order.
    pub fn acked_ids(&self) -> Vec<String> {
        self.lock().acked.iter().map(|a| a.id.clone()).collect()
    }

    /// Compares the acknowledged produces with what the app received;
    /// `success` says which requests the app accepted.
    pub fn report(&self, received: &[Received], success: impl Fn(&Received) -> bool) -> Report {
        let s = self.lock();
        // Successful deliveries per id, in arrival order.
        let mut ok: HashMap<&str, Vec<&Received>> = HashMap::new();
        for r in received.iter().filter(|r| success(r)) {
            ok.entry(r.id()).or_default().push(r);
        }
        for times in ok.values_mut() {
            times.sort_by_key(|r| r.at);
        }
        let mut report = Report { scenario: self.scenario.clone(), produced_acked: s.acked.len(), ..Report::default() };
        // Per key, in acknowledgement order: the first successful delivery of each.
        let mut per_key: HashMap<&str, Vec<(&str, Instant)>> = HashMap::new();
        for a in &s.acked {
            let Some(times) = ok.get(a.id.as_str()) else {
                if !s.dead.contains_key(&a.id) {
                    report.lost.push(a.id.clone());
                }
                continue;
            };
            report.delivered += 1;
            if let Some(key) = a.key.as_deref() {
                per_key.entry(key).or_default().push((&a.id, times[0].at));
            }
        }
        // A message is out of order when a message acknowledged after it
        // (same key) was delivered before it.
        for (key, seq) in &per_key {
            let mut earliest_later: Option<(Instant, &str)> = None;
            for (id, first) in seq.iter().rev() {
                match earliest_later {
                    Some((t, later)) if t < *first => {
                        report.out_of_order.push(format!("{id} after {later} (key {key})"));
                    }
                    Some((t, _)) if t <= *first => {}
                    _ => earliest_later = Some((*first, id)),
                }
            }
        }
        for (id, times) in &ok {
            if !s.acked_ids.contains(*id) {
                report.unknown.push((*id).to_owned());
            }
            for w in times.windows(2) {
                let (first, again) = (w[0].at, w[1].at);
                // Sent before the crash: handled before it, or stamped by
                // the sidecar no later than the crash's millisecond.
                let sent_before = |c: &Crash| first <= c.at || sent_ms(w[0]).is_some_and(|ms| ms <= c.wall_ms);
                let crash =
                    s.crashes.iter().find(|c| sent_before(c) && c.at <= first + self.crash_window && again > c.at);
                if let Some(c) = crash {
                    report.acked_at_crash_before =
                        report.acked_at_crash_before.max(c.at.saturating_duration_since(first));
                    if first > c.at {
                        report.handled_after_kill += 1;
                    }
                    report.acked_at_crash.push((*id).to_owned());
                } else {
                    report.duplicates.push((*id).to_owned());
                }
            }
        }
        report.dead_lettered = s.dead.len();
        report.dead_letter_repeats = s.dead.values().map(|n| n - 1).sum();
        report.lost.sort();
        report.duplicates.sort();
        report.acked_at_crash.sort();
        report.unknown.sort();
        report.crashes = s.crashes.len();
        report
    }
}

/// What a scenario's run showed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Produces answered 2xx.
    pub produced_acked: usize,
    /// Acknowledged ids delivered successfully at least once.
    pub delivered: usize,
    /// Acknowledged ids neither delivered nor dead-lettered.
    pub lost: Vec<String>,
    /// Ids the app accepted more than once (one entry per repeat).
    pub duplicates: Vec<String>,
    /// Repeats of deliveries accepted just before a crash (not duplicates).
    pub acked_at_crash: Vec<String>,
    /// The longest time between the first delivery of an `acked_at_crash`
    /// message and the crash.
    pub acked_at_crash_before: Duration,
    /// Of the `acked_at_crash` repeats, those whose first delivery the app
    /// handled after the kill (sent before it, by the delivery id's stamp).
    pub handled_after_kill: usize,
    /// Messages delivered after a later message of their key.
    pub out_of_order: Vec<String>,
    /// Ids dead-lettered.
    pub dead_lettered: usize,
    /// Dead letters beyond one per id.
    pub dead_letter_repeats: usize,
    /// Accepted ids no producer was acknowledged for.
    pub unknown: Vec<String>,
    /// Crashes recorded.
    pub crashes: usize,
    /// More `name=value` fields for the summary line (see [`Report::note`]).
    pub notes: Vec<(String, String)>,
}

impl Report {
    /// Adds a `name=value` field to the summary line.
    pub fn note(&mut self, name: &str, value: impl std::fmt::Display) {
        self.notes.push((name.to_owned(), value.to_string()));
    }

    /// The one summary line.
    pub fn line(&self) -> String {
        let mut line = format!(
            "scenario={} produced_acked={} delivered={} lost={} duplicates={} out_of_order={} dead_lettered={} \
             acked_at_crash={} acked_at_crash_max_ms={} handled_after_kill={} unknown={} crashes={}",
            self.scenario,
            self.produced_acked,
            self.delivered,
            self.lost.len(),
            self.duplicates.len(),
            self.out_of_order.len(),
            self.dead_lettered,
            self.acked_at_crash.len(),
            self.acked_at_crash_before.as_millis(),
            self.handled_after_kill,
            self.unknown.len(),
            self.crashes,
        );
        for (name, value) in &self.notes {
            line.push_str(&format!(" {name}={value}"));
        }
        line
    }

    /// Prints the summary line (and a few examples of each problem).
    pub fn print(&self) {
        println!("{}", self.line());
        for (what, ids) in [
            ("lost", &self.lost),
            ("duplicates", &self.duplicates),
            ("out_of_order", &self.out_of_order),
            ("acked_at_crash", &self.acked_at_crash),
            ("unknown", &self.unknown),
        ] {
            if !ids.is_empty() {
                println!("  {what} (first {} of {}): {:?}", ids.len().min(10), ids.len(), &ids[..ids.len().min(10)]);
            }
        }
    }

    /// Panics unless nothing was lost, duplicated or unknown.
    pub fn assert_no_loss_no_duplicates(&self) {
        assert!(self.lost.is_empty(), "{}: lost {:?}", self.line(), first(&self.lost));
        assert!(self.duplicates.is_empty(), "{}: duplicates {:?}", self.line(), first(&self.duplicates));
        assert!(self.unknown.is_empty(), "{}: unknown ids {:?}", self.line(), first(&self.unknown));
        assert_eq!(self.dead_letter_repeats, 0, "{}: an id was dead-lettered twice", self.line());
    }

    /// Panics unless per-key order was kept.
    pub fn assert_in_order(&self) {
        assert!(self.out_of_order.is_empty(), "{}: out of order {:?}", self.line(), first(&self.out_of_order));
    }
}

fn first(v: &[String]) -> &[String] {
    &v[..v.len().min(10)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, at: Instant) -> Received {
        let headers = [("ce-id".to_owned(), id.to_owned())].into_iter().collect();
        Received { path: "/".into(), headers, body: Default::default(), at }
    }

    #[test]
    fn counts_lost_duplicates_disorder_and_excuses_repeats_at_a_crash() {
        let c = Checker::new("unit");
        for id in ["a1", "a2", "a3", "b1", "gone", "dead"] {
            c.acked(id, Some(&id[..1]));
        }
        c.acked("a1", Some("a")); // a retried produce: ignored
        c.dead_lettered("dead");
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let got = vec![
            req("a1", at(10)),
            req("a3", at(20)),
            req("a2", at(30)), // before it: a3, acked later
            req("b1", at(40)),
            req("b1", at(50)), // a plain duplicate
            req("x", at(60)),  // unknown
            req("failed", at(70)),
        ];
        let r = c.report(&got, |r| r.id() != "failed");
        assert_eq!((r.produced_acked, r.delivered, r.dead_lettered), (6, 4, 1));
        assert_eq!(r.lost, ["gone"]);
        assert_eq!(r.duplicates, ["b1"]);
        assert_eq!(r.out_of_order.len(), 1, "{:?}", r.out_of_order);
        assert_eq!(r.unknown, ["x"]);
        assert!(r.line().starts_with("scenario=unit produced_acked=6 delivered=4 lost=1 duplicates=1 out_of_order=1"));

        // A repeat of a delivery accepted just before a crash is excused.
        let c = Checker::new("crash");
        c.acked("m", None);
        let before = Instant::now();
        c.crash();
        let r = c.report(&[req("m", before), req("m", Instant::now() + Duration::from_millis(5))], |_| true);
        assert!(r.duplicates.is_empty());
        assert_eq!(r.acked_at_crash, ["m"]);
        assert_eq!(r.handled_after_kill, 0);
    }

    /// A request the dead sidecar sent, handled by the app just after the
    /// kill, is told apart by its delivery id's stamp.
    #[test]
    fn a_delivery_stamped_before_the_crash_but_handled_after_it_is_excused() {
        fn sent(id: &str, at: Instant, ms: u64) -> Received {
            let mut r = req(id, at);
            let delivery = format!("{:08x}-{:04x}-7abc-8def-0123456789ab", ms >> 16, ms & 0xffff);
            r.headers.insert("ferry-delivery-id".into(), delivery);
            r
        }
        let c = Checker::new("late");
        c.acked("m", None);
        c.acked("n", None);
        c.crash();
        let crash = c.lock().crashes[0];
        let (after, later) = (crash.at + Duration::from_millis(1), crash.at + Duration::from_millis(300));
        assert_eq!(sent_ms(&sent("m", after, crash.wall_ms)), Some(crash.wall_ms));
        let got = vec![
            sent("m", after, crash.wall_ms),       // sent by the dead sidecar
            sent("m", later, crash.wall_ms + 250), // its redelivery
            sent("n", after, crash.wall_ms + 1),   // sent after the crash...
            sent("n", later, crash.wall_ms + 250), // ...so this is a duplicate
        ];
        let r = c.report(&got, |_| true);
        assert_eq!(r.acked_at_crash, ["m"]);
        assert_eq!(r.handled_after_kill, 1);
        assert_eq!(r.duplicates, ["n"]);
        // Without a delivery id, only the app's clock counts.
        let r = c.report(&[req("m", after), req("m", later)], |_| true);
        assert_eq!(r.duplicates, ["m"]);
    }
}
