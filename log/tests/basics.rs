//! Append, read, reopen, cursors and retention on the real filesystem.

use ferry_log::{Budget, Error, Log, LogOptions, NewRecord};

fn rec(i: u64) -> NewRecord {
    NewRecord::new(format!("id-{i}"), format!("payload-{i}").into_bytes()).with_key(format!("k{}", i % 3))
}

fn small_segments() -> LogOptions {
    LogOptions { segment_bytes: 1024, ..LogOptions::default() }
}

#[test]
fn appended_records_read_back_in_order_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, report) = Log::open(dir.path(), small_segments()).unwrap();
        assert!(report.is_clean());
        for i in 0..50 {
            let r = log.append_blocking(&[rec(i)]).unwrap();
            assert_eq!(r, i..i + 1);
        }
        let r = log.append_blocking(&[rec(50), rec(51), rec(52)]).unwrap();
        assert_eq!(r, 50..53);
    }
    let (log, report) = Log::open(dir.path(), small_segments()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.records, 53);
    assert!(report.segments >= 3, "small segments should roll over: {report:?}");
    let mut from = 0;
    let mut got = Vec::new();
    while from < log.next_offset() {
        let batch = log.read(from, 7, 1 << 20).unwrap();
        assert!(batch.skipped.is_empty());
        got.extend(batch.records);
        from = batch.next;
    }
    assert_eq!(got.len(), 53);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
        assert_eq!(r.id, format!("id-{i}"));
        assert_eq!(r.payload, format!("payload-{i}").as_bytes());
        assert_eq!(r.key.as_deref(), Some(format!("k{}", i % 3).as_str()));
    }
}

#[test]
fn scan_visits_every_record_from_an_offset_across_segments_until_it_breaks() {
    use std::ops::ControlFlow;
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), small_segments()).unwrap();
    for i in 0..53 {
        log.append_blocking(&[rec(i)]).unwrap();
    }
    assert!(log.stats().segments >= 3, "{:?}", log.stats());
    let mut seen = Vec::new();
    let none = log
        .scan(5, |r| {
            seen.push((r.offset, r.id));
            ControlFlow::<()>::Continue(())
        })
        .unwrap();
    assert_eq!(none, None, "ran to the end");
    assert_eq!(seen, (5..53).map(|i| (i, format!("id-{i}"))).collect::<Vec<_>>());
    let mut visited = 0;
    let found = log
        .scan(0, |r| {
            visited += 1;
            if r.offset == 40 {
                ControlFlow::Break(r.id)
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!((found.as_deref(), visited), (Some("id-40"), 41), "stops where it breaks");
    assert_eq!(log.scan(53, |_| ControlFlow::Break(())).unwrap(), None, "nothing past the end");
}

#[test]
fn retention_deletes_only_segments_every_cursor_passed() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), small_segments()).unwrap();
    for i in 0..60 {
        log.append_blocking(&[rec(i)]).unwrap();
    }
    let before = log.stats();
    log.commit("b", 10).unwrap();
    log.commit("a", 40).unwrap();
    let mid = log.stats();
    assert!(mid.start_offset <= 10, "cursor b at 10 must keep offset 10: {mid:?}");
    log.commit("b", 60).unwrap();
    let after = log.stats();
    assert!(after.segments < before.segments, "{before:?} -> {after:?}");
    assert!(after.start_offset > 10 && after.start_offset <= 40, "{after:?}");
    // Records at or after the slowest cursor are all still readable.
    let batch = log.read(40, 100, 1 << 20).unwrap();
    assert_eq!(batch.records.first().map(|r| r.offset), Some(40));
    drop(log);
    let (log, _) = Log::open(dir.path(), small_segments()).unwrap();
    assert_eq!(log.cursor("a"), Some(40));
    assert_eq!(log.cursor("b"), Some(60));
    assert_eq!(log.stats().start_offset, after.start_offset);
}

#[test]
fn commit_with_changes_cursors_in_one_write_and_retention_waits_for_the_slowest() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), small_segments()).unwrap();
    for i in 0..60 {
        log.append_blocking(&[rec(i)]).unwrap();
    }
    let before = log.stats();
    log.commit_with(|c| {
        c.insert("forwarded".into(), 60);
        c.insert("retained".into(), 5);
    })
    .unwrap();
    assert!(log.stats().start_offset <= 5, "retained at 5 keeps offset 5: {:?}", log.stats());
    assert_eq!(log.stats().segments, before.segments);
    // Raise one to another, given what they are now.
    log.commit_with(|c| {
        let forwarded = c["forwarded"];
        c.insert("retained".into(), forwarded - 10);
    })
    .unwrap();
    let after = log.stats();
    assert!(after.start_offset > 5 && after.start_offset <= 50, "{after:?}");
    let bad = log.commit_with(|c| {
        c.insert(String::new(), 2);
    });
    assert!(matches!(bad, Err(Error::Invalid(_))));
    assert_eq!(log.cursors().len(), 2, "an invalid name commits nothing");
    drop(log);
    let (log, _) = Log::open(dir.path(), small_segments()).unwrap();
    assert_eq!((log.cursor("forwarded"), log.cursor("retained")), (Some(60), Some(50)));
}

#[test]
fn an_append_over_the_budget_fails_with_full_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let budget = Budget::new(2000);
    let (log, _) = Log::open(dir.path(), LogOptions { budget: budget.clone(), ..small_segments() }).unwrap();
    let mut ok = 0;
    let err = loop {
        match log.append_blocking(&[rec(ok)]) {
            Ok(_) => ok += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::Full { limit: 2000, .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(log.next_offset(), ok);
    assert!(budget.used() <= 2000);
    // Freeing space by retention makes appends work again.
    log.commit("fwd", ok).unwrap();
    log.append_blocking(&[rec(ok)]).unwrap();
}

/// Records every cursor passed still hold their budget while their segment
/// is active (retention deletes sealed segments only): with a budget below
/// one segment, appends stay refused however far the cursor goes, until
/// the active segment is sealed; then the cursor frees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealing_the_active_segment_lets_retention_free_what_every_cursor_passed() {
    let dir = tempfile::tempdir().unwrap();
    let budget = Budget::new(600);
    let (log, _) = Log::open(dir.path(), LogOptions { budget: budget.clone(), ..small_segments() }).unwrap();
    let mut ok = 0;
    while log.append(&[rec(ok)]).await.is_ok() {
        ok += 1;
    }
    log.commit("fwd", ok).unwrap();
    assert_eq!(log.stats().segments, 1, "all in the active segment");
    assert!(matches!(log.append(&[rec(ok)]).await, Err(Error::Full { .. })), "the cursor alone frees nothing");

    assert!(log.seal_active().await.unwrap(), "a segment with records is sealed");
    let stats = log.stats();
    assert_eq!((stats.segments, stats.records, stats.start_offset), (1, 0, ok), "and deleted: {stats:?}");
    log.append(&[rec(ok)]).await.expect("room again");
    assert_eq!(log.read(ok, 10, usize::MAX).unwrap().records[0].id, format!("id-{ok}"));

    // A sealed segment with records not yet passed stays until they are.
    assert!(log.seal_active().await.unwrap());
    assert_eq!(log.stats().segments, 2);
    log.commit("fwd", ok + 1).unwrap();
    assert_eq!(log.stats().segments, 1);
    assert!(!log.seal_active().await.unwrap(), "an empty active segment is not sealed");
    drop(log);
    let (log, report) = Log::open(dir.path(), small_segments()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(log.next_offset(), ok + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_share_syncs_and_every_offset_is_unique() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), LogOptions::default()).unwrap();
    let log = std::sync::Arc::new(log);
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut offs = Vec::new();
            for i in 0..20 {
                offs.push(log.append(&[rec(t * 1000 + i)]).await.unwrap().start);
            }
            offs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (0..64 * 20).collect::<Vec<_>>());
}
