//! The database's records, indexes and counters, on a temporary directory.
use super::*;
use crate::testing::sha256 as d;

#[test]
fn manifests_tags_and_repos_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let m = Db::open(dir.path()).unwrap();
    let rec = ManifestRecord {
        media_type: "application/vnd.oci.image.index.v1+json".into(),
        bytes: Bytes::from_static(b"{\"a\":1}"),
        fetched_ms: 7,
    };
    let tag = TagRecord {
        digest: d(b"{\"a\":1}").to_string(),
        checked_ms: 7,
    };
    let md = d(b"{\"a\":1}");
    m.put_manifest("docker.io", "library/a", &md, &rec, Some(("latest", &tag)))
        .unwrap();
    assert_eq!(
        m.manifest("docker.io", "library/a", &md).unwrap(),
        Some(rec)
    );
    assert_eq!(m.manifest("ghcr.io", "library/a", &md).unwrap(), None);
    assert_eq!(
        m.tag("docker.io", "library/a", "latest").unwrap(),
        Some(tag)
    );
    assert_eq!(
        m.tags_of("docker.io", "library/a").unwrap(),
        vec!["latest".to_string()]
    );
    // A repository that is a prefix of another does not see its tags.
    assert!(m.tags_of("docker.io", "library").unwrap().is_empty());
    assert_eq!(
        m.repositories().unwrap(),
        vec![("docker.io".into(), "library/a".into())]
    );
}

#[test]
fn usage_counter_and_lru_order_follow_records() {
    let dir = tempfile::tempdir().unwrap();
    let m = Db::open(dir.path()).unwrap();
    let (a, b, c) = (d(b"a"), d(b"b"), d(b"c"));
    m.record_blob(&a, 10, 1_000).unwrap();
    m.record_blob(&b, 20, 2_000).unwrap();
    m.record_blob(&c, 30, 3_000).unwrap();
    assert_eq!(m.usage(), 60);
    // Re-recording replaces, not adds.
    m.record_blob(&c, 30, 3_500).unwrap();
    assert_eq!(m.usage(), 60);
    assert_eq!(
        m.lru().collect::<Vec<_>>(),
        vec![a.clone(), b.clone(), c.clone()]
    );
    m.touch_blob(&a, 10_000).unwrap();
    assert_eq!(
        m.lru().collect::<Vec<_>>(),
        vec![b.clone(), c.clone(), a.clone()]
    );
    // Within the granularity a touch changes nothing.
    m.touch_blob(&b, 2_500).unwrap();
    assert_eq!(m.lru().next(), Some(b.clone()));
    assert_eq!(m.remove_blob(&b).unwrap(), Some(20));
    assert_eq!(m.remove_blob(&b).unwrap(), None);
    assert_eq!(m.usage(), 40);
    assert_eq!(m.lru().collect::<Vec<_>>(), vec![c, a]);
}

#[test]
fn eviction_steps_skip_pins_and_resume_after_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let m = Db::open(dir.path()).unwrap();
    let ds: Vec<Digest> = (0..6u8).map(|i| d(&[i])).collect();
    for (i, dg) in ds.iter().enumerate() {
        m.record_blob(dg, 10, 1000 * (i as u64 + 1)).unwrap();
    }
    let pinned: HashSet<Digest> = [ds[0].clone()].into();
    // Down to 20 bytes, two at a time: the pinned oldest stays.
    let step = m.evict_lru(20, &pinned, None, 2).unwrap();
    assert_eq!(step.skipped_pinned, 1);
    assert_eq!(step.removed, vec![(ds[1].clone(), 10), (ds[2].clone(), 10)]);
    let step = m.evict_lru(20, &pinned, step.next.as_deref(), 2).unwrap();
    assert_eq!(step.skipped_pinned, 0, "the cursor is past the pinned blob");
    assert_eq!(step.removed, vec![(ds[3].clone(), 10), (ds[4].clone(), 10)]);
    assert_eq!(m.usage(), 20);
    let step = m.evict_lru(20, &pinned, step.next.as_deref(), 2).unwrap();
    assert!(step.removed.is_empty() && step.next.is_none());
    assert_eq!(
        m.lru().collect::<Vec<_>>(),
        vec![ds[0].clone(), ds[5].clone()]
    );
}

#[test]
fn reconcile_keeps_matching_records_and_reports_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let m = Db::open(dir.path()).unwrap();
    let (kept, resized, gone, orphan) = (d(b"k"), d(b"r"), d(b"g"), d(b"o"));
    m.record_blob(&kept, 1, 1).unwrap();
    m.record_blob(&resized, 5, 1).unwrap();
    m.record_blob(&gone, 7, 1).unwrap();
    let r = m
        .reconcile(vec![
            (kept.clone(), 1),
            (resized.clone(), 4),
            (orphan.clone(), 3),
        ])
        .unwrap();
    assert_eq!((r.blobs, r.bytes, r.records_without_file), (1, 1, 1));
    assert_eq!(r.untrusted_files, vec![resized.clone()]);
    assert_eq!(r.orphans, vec![(orphan, 3)]);
    assert_eq!(m.usage(), 1);
    assert!(m.blob(&resized).unwrap().is_none() && m.blob(&gone).unwrap().is_none());
}
