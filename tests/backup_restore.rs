//! Round trips through the real binary: every file kind, files larger than several segments,
//! incrementals, include filters, listing.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use cbcr_tests::*;
use rand::{Rng, SeedableRng};

#[test]
fn round_trip_is_bit_exact_for_every_file_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    init_small(&repo);
    // 3.5 segments of 1 MiB.
    make_tree(&src, 1, 3 * (1 << 20) + (1 << 19));
    let backup = ok(&["backup", "--repo", s(&repo), s(&src), "--json", "--cores", "2"]);
    let summary = last_json(&backup);
    assert_eq!(summary["type"], "summary");
    for field in
        ["snapshot_id", "bytes_read", "bytes_new", "bytes_stored", "chunks_total", "chunks_new", "files", "duration_s"]
    {
        assert!(!summary[field].is_null(), "summary lacks {field}: {summary}");
    }
    assert_eq!(summary["files"], 9);
    assert_eq!(summary["bytes_read"], dir_size(&src));
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    let restored = out.join(src.strip_prefix("/").unwrap());
    assert_same_tree(&src, &restored);
    // All-zero chunks are holes: the sparse file's 3 MiB take (almost) no blocks.
    let sparse = fs::metadata(restored.join("sparse")).unwrap();
    assert!(sparse.blocks() * 512 < 1 << 20, "sparse file restored with {} blocks", sparse.blocks());
    ok(&["verify", "--repo", s(&repo), "--read-data"]);
}

#[test]
fn one_core_and_two_cores_make_the_same_snapshot_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 2, 5 << 20);
    for cores in ["1", "2"] {
        let repo = tmp.path().join(format!("repo{cores}"));
        init_small(&repo);
        ok(&["backup", "--repo", s(&repo), s(&src), "--cores", cores]);
    }
    // Different keys make different ids, so compare the listing instead.
    let list = |cores: &str| text(&ok(&["ls", "latest", "--repo", s(&tmp.path().join(format!("repo{cores}")))]).stdout);
    assert_eq!(list("1"), list("2"));
    assert!(list("1").contains("/big.db"));
}

#[test]
fn incremental_of_unchanged_data_adds_under_one_percent() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    init_small(&repo);
    make_tree(&src, 3, 4 << 20);
    let first = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    let size1 = dir_size(&repo);
    let second = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    let size2 = dir_size(&repo);
    assert_eq!(second["parent"], first["snapshot_id"], "the parent is found by host and paths");
    assert_eq!(second["bytes_read"], 0, "unchanged files are not read");
    assert_eq!(second["bytes_new"], 0);
    assert!((size2 - size1) * 100 < size1, "incremental grew the repository by {} of {size1} bytes", size2 - size1);

    // A changed file is read again; only its new chunks are stored.
    let mut data = fs::read(src.join("big.db")).unwrap();
    data[100_000] ^= 0xff;
    fs::write(src.join("big.db"), &data).unwrap();
    let third = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    assert_eq!(third["bytes_read"], data.len());
    let new = third["bytes_new"].as_u64().unwrap();
    assert!(new > 0 && new <= 3 * 64 * 1024, "one changed byte stored {new} new bytes");
    // --parent names the snapshot to compare against.
    let fourth = last_json(&ok(&[
        "backup",
        "--repo",
        s(&repo),
        s(&src),
        "--json",
        "--parent",
        &first["snapshot_id"].as_str().unwrap()[..10],
    ]));
    assert_eq!(fourth["parent"], first["snapshot_id"]);
    assert_eq!(fourth["bytes_read"], data.len(), "big.db differs from the first snapshot");
    ok(&["verify", "--repo", s(&repo), "--read-data"]);
}

#[test]
fn restore_include_picks_one_subtree_and_snapshots_list() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    make_tree(&src, 4, 100_000);
    // Created on first use with the defaults (`--init`), the repository from the environment.
    let out_backup = cbcr_env(&["backup", "--init", s(&src), "--json"], &[("CBCR_REPO", s(&repo))]);
    assert!(out_backup.status.success(), "{}", text(&out_backup.stderr));
    let include = src.join("dir/sub");
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out), "--include", s(&include)]);
    let restored = out.join(src.strip_prefix("/").unwrap());
    assert_same_tree(&include, &restored.join("dir/sub"));
    assert!(!restored.join("random.bin").exists(), "files outside --include are not restored");
    let missing = cbcr(&["restore", "latest", "--repo", s(&repo), "--target", s(&out), "--include", "/no/such/path"]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing.stderr));
    assert!(text(&missing.stderr).contains("/no/such/path"));
    let listing = text(&ok(&["snapshots", "--repo", s(&repo)]).stdout);
    assert_eq!(listing.lines().count(), 1);
    assert!(listing.contains(s(&src)));
}

#[test]
fn synthetic_database_generations_back_up_and_compare_equal_to_regeneration() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    init_small(&repo);
    let url = |gen: u32, seed: u32| format!("synth://pg?size=24MiB&seed={seed}&gen={gen}");
    let first = last_json(&ok(&["backup", "--repo", s(&repo), &url(1, 3), "--json"]));
    let second = last_json(&ok(&["backup", "--repo", s(&repo), &url(2, 3), "--json"]));
    assert_eq!(second["parent"], first["snapshot_id"], "generation 2 finds generation 1 as its parent");
    let (total, new) = (second["bytes_total"].as_u64().unwrap(), second["bytes_new"].as_u64().unwrap());
    assert!(new * 2 < total, "2% of pages changed, yet {new} of {total} bytes were new");
    ok(&["verify", "--repo", s(&repo), "--against", &url(2, 3)]);
    let id = &first["snapshot_id"].as_str().unwrap()[..12];
    ok(&["verify", "--repo", s(&repo), "--against", &url(1, 3), "--snapshot", id]);
    for wrong in [url(1, 3), url(2, 4)] {
        let out = cbcr(&["verify", "--repo", s(&repo), "--against", &wrong]);
        assert_eq!(out.status.code(), Some(13), "{wrong}: {}", text(&out.stderr));
    }
    let out = tmp.path().join("out");
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    let table = fs::metadata(out.join("base/16384/16397")).unwrap();
    assert_eq!(table.mode() & 0o777, 0o600);
    ok(&["verify", "--repo", s(&repo), "--read-data"]);
}

/// Compressed size of `pages` (zstd -1, each on its own): what storing only them costs.
fn compressed_pages(file: &[u8], pages: &[usize]) -> u64 {
    let page = |p: usize| &file[p * datagen::PAGE..(p + 1) * datagen::PAGE];
    pages.iter().map(|&p| zstd::bulk::compress(page(p), 1).unwrap().len() as u64).sum()
}

/// An UPDATE: a few bytes of a tuple and the page header's LSN change.
fn update_page(file: &mut [u8], page: usize, generation: u8) {
    let at = page * datagen::PAGE;
    file[at..at + 8].copy_from_slice(&[generation; 8]);
    file[at + 4000..at + 4016].fill(generation.wrapping_mul(31));
}

/// Users back up into a new directory each time (`pg_basebackup -D /backups/<date>`): with
/// `--db`, the parent is the database's latest snapshot and files match by their path below
/// the source root, so the incremental still stores only the changed pages.
#[test]
fn a_new_directory_per_backup_with_db_still_stores_only_the_changed_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, out) = (tmp.path().join("repo"), tmp.path().join("out"));
    let day = |d: &str| tmp.path().join("backups").join(d);
    let relation = "base/16384/16397";
    let mut pages = datagen::db_pages(22, 512);
    fs::create_dir_all(day("2026-12-01").join(relation).parent().unwrap()).unwrap();
    fs::write(day("2026-12-01").join(relation), &pages).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut touched: Vec<usize> = (0..30).map(|_| rng.gen_range(0..512)).collect();
    touched.sort_unstable();
    touched.dedup();
    for &p in &touched {
        update_page(&mut pages, p, 2);
    }
    fs::create_dir_all(day("2026-12-02").join(relation).parent().unwrap()).unwrap();
    fs::write(day("2026-12-02").join(relation), &pages).unwrap();
    let bound = compressed_pages(&pages, &touched) * 3 / 2;
    // Each directory backed up on its own, as a user would, with and without --db.
    let grew = |repo: &Path, db: &[&str]| -> (u64, serde_json::Value, serde_json::Value) {
        init_small(repo);
        let first = last_json(&ok(&[&["backup", "--repo", s(repo), s(&day("2026-12-01")), "--json"][..], db].concat()));
        let before = dir_size(&repo.join("packs"));
        let second =
            last_json(&ok(&[&["backup", "--repo", s(repo), s(&day("2026-12-02")), "--json"][..], db].concat()));
        (dir_size(&repo.join("packs")) - before, first, second)
    };
    let (added, first, second) = grew(&repo, &["--db", "pg-orders"]);
    eprintln!("--db: {} changed pages added {added} bytes of packs, bound {bound}", touched.len());
    assert_eq!(second["parent"], first["snapshot_id"], "the parent is the database's latest");
    assert!(added <= bound, "{} changed pages added {added} bytes, more than {bound}", touched.len());
    let (without, _, second_without) = grew(&tmp.path().join("plain"), &[]);
    assert!(second_without["parent"].is_null(), "without --db the other directory has no parent");
    assert!(without > 2 * added, "without --db: {without} bytes against {added}");
    // The database names its snapshots: listing, ls and restore take it.
    let listed = ok(&["snapshots", "--repo", s(&repo), "--db", "pg-orders", "--json"]);
    assert_eq!(snapshot_ids(&listed).len(), 2);
    assert!(text(&listed.stdout).contains("\"db\":\"pg-orders\""), "{}", text(&listed.stdout));
    assert!(snapshot_ids(&ok(&["snapshots", "--repo", s(&repo), "--db", "other", "--json"])).is_empty());
    ok(&["restore", "latest", "--db", "pg-orders", "--repo", s(&repo), "--target", s(&out)]);
    assert_same_tree(&day("2026-12-02"), &out.join(day("2026-12-02").strip_prefix("/").unwrap()));
    let none = cbcr(&["ls", "latest", "--db", "other", "--repo", s(&repo)]);
    assert_eq!(none.status.code(), Some(1), "{}", text(&none.stderr));
    assert!(text(&none.stderr).contains("no snapshots of database \"other\""), "{}", text(&none.stderr));
    let bad = cbcr(&["backup", "--repo", s(&repo), s(&day("2026-12-02")), "--db", ""]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    // --parent re-roots the same way, without --db.
    let explicit = tmp.path().join("explicit");
    init_small(&explicit);
    let base = last_json(&ok(&["backup", "--repo", s(&explicit), s(&day("2026-12-01")), "--json"]));
    let before = dir_size(&explicit.join("packs"));
    let base_id = base["snapshot_id"].as_str().unwrap();
    let next =
        last_json(&ok(&["backup", "--repo", s(&explicit), s(&day("2026-12-02")), "--parent", base_id, "--json"]));
    assert_eq!(next["parent"], base["snapshot_id"]);
    let added = dir_size(&explicit.join("packs")) - before;
    assert!(added <= bound, "--parent: {added} bytes, more than {bound}");
}

#[test]
fn page_files_store_only_the_changed_pages_in_an_incremental() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("data"), tmp.path().join("repo"), tmp.path().join("out"));
    init_small(&repo);
    let rel = src.join("base/16384/16397");
    fs::create_dir_all(rel.parent().unwrap()).unwrap();
    let mut pages = datagen::db_pages(21, 512); // 4 MiB: 4 segments of 1 MiB
    fs::write(&rel, &pages).unwrap();
    ok(&["backup", "--repo", s(&repo), s(&src)]);
    // Seeded scattered changes: 20 pages updated in place, 10 rewritten entirely.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut touched: Vec<usize> = (0..30).map(|_| rng.gen_range(0..512)).collect();
    touched.sort_unstable();
    touched.dedup();
    for (i, &p) in touched.iter().enumerate() {
        if i % 3 == 0 {
            pages[p * datagen::PAGE..(p + 1) * datagen::PAGE].copy_from_slice(&datagen::db_pages(1000 + p as u64, 1));
        } else {
            update_page(&mut pages, p, 2);
        }
    }
    fs::write(&rel, &pages).unwrap();
    let before = dir_size(&repo.join("packs"));
    ok(&["backup", "--repo", s(&repo), s(&src)]);
    let added = dir_size(&repo.join("packs")) - before;
    let bound = compressed_pages(&pages, &touched) * 3 / 2;
    eprintln!("plain: {} changed pages added {added} bytes of packs, bound {bound}", touched.len());
    assert!(added <= bound, "{} changed pages added {added} bytes of packs, more than {bound}", touched.len());
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));

    // Policy (a), page chunks stored whole, and content-defined chunking both cost more.
    for (name, args) in [("whole", &["--delta-chain", "0"][..]), ("cdc", &["--chunking", "cdc"][..])] {
        let other = tmp.path().join(name);
        init_small(&other);
        fs::write(&rel, datagen::db_pages(21, 512)).unwrap();
        ok(&[&["backup", "--repo", s(&other), s(&src)][..], args].concat());
        fs::write(&rel, &pages).unwrap();
        let before = dir_size(&other.join("packs"));
        ok(&[&["backup", "--repo", s(&other), s(&src)][..], args].concat());
        let theirs = dir_size(&other.join("packs")) - before;
        assert!(theirs > 2 * added, "{name}: {theirs} bytes against {added} with block deltas");
    }
    let bad = cbcr(&["backup", "--repo", s(&repo), s(&src), "--page-chunk", "12KiB"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
}

#[test]
fn chunking_is_set_per_path_and_the_longest_path_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    let (innodb, relation) = (src.join("mysql/ibdata1"), src.join("base/1/1259"));
    // What the incremental adds to the packs for one UPDATE in each file, in a fresh repository.
    let run = |name: &str, rules: &[String]| -> u64 {
        let repo = tmp.path().join(name);
        init_small(&repo);
        let mut files = [(&innodb, datagen::db_pages(31, 256), 40), (&relation, datagen::db_pages(32, 128), 10)];
        for (path, pages, _) in &files {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, pages).unwrap();
        }
        let mut args = vec!["backup", "--repo", s(&repo), s(&src)];
        args.extend(rules.iter().flat_map(|r| ["--chunking", r.as_str()]));
        ok(&args);
        for (path, pages, page) in &mut files {
            update_page(pages, *page, 3);
            fs::write(path, pages).unwrap();
        }
        let before = dir_size(&repo.join("packs"));
        ok(&args);
        dir_size(&repo.join("packs")) - before
    };
    let mysql = format!("{}=pages:16KiB", s(&src.join("mysql")));
    let cdc_everywhere = run("cdc", &["cdc".into()]);
    let mysql_pages = run("mysql", &["cdc".into(), mysql.clone()]);
    let both_pages = run("both", std::slice::from_ref(&mysql));
    let base_cdc = run("base", &[mysql, format!("{}=cdc", s(&src.join("base"))), format!("{}=auto", s(&src))]);
    // A content-defined chunk of these pages compresses to a few KiB; the delta of one UPDATE
    // to a few dozen bytes.
    assert!(mysql_pages + 1024 <= cdc_everywhere, "ibdata1 in page blocks: {mysql_pages} vs {cdc_everywhere}");
    assert!(both_pages + 1024 <= mysql_pages, "auto gives base/ page blocks: {both_pages} vs {mysql_pages}");
    // base/ content-defined again, by its own rule over SRC=auto (trees differ by a few bytes).
    assert!(base_cdc >= both_pages + 1024 && base_cdc.abs_diff(mysql_pages) < 512, "{base_cdc} vs {mysql_pages}");
    let bad = cbcr(&["backup", "--repo", s(&tmp.path().join("cdc")), s(&src), "--chunking", "=cdc"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
}

#[test]
fn a_relation_file_with_a_torn_last_page_is_chunked_by_content_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("data"), tmp.path().join("repo"), tmp.path().join("out"));
    init_small(&repo);
    fs::create_dir_all(src.join("base/1")).unwrap();
    let mut torn = datagen::db_pages(40, 20);
    torn.truncate(19 * datagen::PAGE + 3000);
    fs::write(src.join("base/1/16500"), &torn).unwrap();
    fs::write(src.join("base/1/pg_filenode.map"), [1u8; 512]).unwrap(); // not a relation: no warning
    let backup = ok(&["backup", "--repo", s(&repo), s(&src), "--json"]);
    let warnings: Vec<_> =
        text(&backup.stdout).lines().filter(|l| l.contains("\"warning\"")).map(String::from).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("16500") && warnings[0].contains("not a whole number of 8 KiB pages"), "{warnings:?}");
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
}

#[test]
fn block_delta_chains_are_bounded_restore_every_generation_and_a_broken_link_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("data"), tmp.path().join("repo"));
    init_small(&repo);
    let rel = src.join("base/16384/16400");
    fs::create_dir_all(rel.parent().unwrap()).unwrap();
    let mut pages = datagen::db_pages(8, 256); // 2 MiB, 32 blocks of 64 KiB
    let hot = [1usize, 17, 40, 99, 130, 201, 255]; // 7 blocks, changed in every generation
    let mut generations = vec![];
    let mut new_bytes = vec![];
    let mut first_packs = vec![];
    for generation in 0..6u8 {
        if generation > 0 {
            for &p in &hot {
                update_page(&mut pages, p, generation);
            }
        }
        fs::write(&rel, &pages).unwrap();
        let summary = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--delta-chain", "2", "--json"]));
        new_bytes.push(summary["bytes_new"].as_u64().unwrap());
        generations.push((summary["snapshot_id"].as_str().unwrap().to_owned(), pages.clone()));
        if generation == 0 {
            first_packs = packs(&repo);
        }
    }
    // Generations 1 and 2 are deltas of depth 1 and 2; generation 3 would be depth 3, so its
    // changed blocks are stored whole (re-based); 4 and 5 are deltas on top of those again.
    let whole = hot.len() as u64 * 65536;
    assert!(new_bytes[1] < whole / 4 && new_bytes[2] < whole / 4, "deltas: {new_bytes:?}");
    assert!(new_bytes[3] >= whole, "re-based: {new_bytes:?}");
    assert!(new_bytes[4] < whole / 4 && new_bytes[5] < whole / 4, "deltas again: {new_bytes:?}");
    for (id, content) in &generations {
        let out = tmp.path().join(format!("out-{id}"));
        ok(&["restore", id, "--repo", s(&repo), "--target", s(&out)]);
        let restored = fs::read(out.join(rel.strip_prefix("/").unwrap())).unwrap();
        assert!(restored == *content, "snapshot {id} restores bit-exact");
    }
    ok(&["verify", "--repo", s(&repo), "--read-data"]);

    // Lose the first backup's packs: every delta of generations 1 and 2 has lost its base.
    for p in &first_packs {
        fs::remove_file(p).unwrap();
    }
    let verify = cbcr(&["verify", "--repo", s(&repo), "--read-data", "--json"]);
    assert_eq!(verify.status.code(), Some(13), "{}", text(&verify.stderr));
    let report = text(&verify.stdout);
    assert!(report.contains("broken link at depth 1 of its chain"), "{report}");
    // Verify recorded the deltas as damaged: restore names them so without reading them.
    let restore = cbcr(&["restore", &generations[2].0, "--repo", s(&repo), "--target", s(&tmp.path().join("lost"))]);
    assert_eq!(restore.status.code(), Some(13), "{}", text(&restore.stderr));
    assert!(text(&restore.stderr).contains("found damaged by `cbcr verify`"), "{}", text(&restore.stderr));
    // Without the record, restore finds the broken link itself.
    fs::remove_dir_all(repo.join("damaged")).unwrap();
    let restore = cbcr(&["restore", &generations[2].0, "--repo", s(&repo), "--target", s(&tmp.path().join("lost2"))]);
    assert_eq!(restore.status.code(), Some(13), "{}", text(&restore.stderr));
    assert!(text(&restore.stderr).contains("broken link"), "{}", text(&restore.stderr));
    // Generation 3 was stored whole where it changed, so 3, 4 and 5 only need their own packs
    // and the unchanged blocks' first copies: those are gone too, and named.
}

#[test]
fn a_file_changing_while_it_is_read_is_named_and_the_backup_is_partial() {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    init_small(&repo);
    fs::create_dir_all(&src).unwrap();
    let live = src.join("live.db");
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    fs::write(&live, &data).unwrap();
    fs::write(src.join("still.txt"), b"unchanged").unwrap();

    // A writer that keeps rewriting one byte, as a live database keeps writing pages.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, live) = (std::sync::Arc::clone(&stop), live.clone());
        std::thread::spawn(move || {
            let f = fs::OpenOptions::new().write(true).open(&live).unwrap();
            let mut i = 0u64;
            // Without pauses: a byte changing between two reads of the same chunk is the case
            // to catch (a blob stored that does not match its id).
            while !stop.load(Ordering::Relaxed) {
                f.write_at(&[i as u8], (i * 8191) % (64 << 20)).unwrap();
                i += 1;
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    let backup = cbcr(&["backup", "--repo", s(&repo), s(&src), "--json"]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();

    assert_eq!(backup.status.code(), Some(3), "{}", text(&backup.stderr));
    // With --json, warnings are events on stdout.
    let events = text(&backup.stdout);
    let warned = |name: &str| events.lines().any(|l| l.contains("\"warning\"") && l.contains(name));
    assert!(warned("live.db") && events.contains("changed while it was read"), "{events}");
    assert!(!warned("still.txt"), "{events}");
    let summary = last_json(&backup);
    assert_eq!(summary["files_changed"], 1, "{summary}");
    // The snapshot is there and restores; the unchanged file is exact.
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    let restored = out.join(src.strip_prefix("/").unwrap());
    assert_eq!(fs::read(restored.join("still.txt")).unwrap(), b"unchanged");
    assert_eq!(fs::metadata(restored.join("live.db")).unwrap().len(), 64 << 20);
    // Torn or not, every blob stored matches its id.
    ok(&["verify", "--repo", s(&repo), "--read-data"]);
}

#[test]
fn page_files_inside_a_tar_store_only_the_changed_pages_in_an_incremental() {
    let tmp = tempfile::tempdir().unwrap();
    let (pgdata, src, repo, out) =
        (tmp.path().join("pgdata"), tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    // One segment holds the whole tar: where a moved member crosses a segment boundary, the
    // two partial blocks beside it are new (two per 1 GiB segment by default).
    ok(&["init", "--repo", s(&repo), "--segment-size", "8MiB"]);
    // A small file first, so the relation files' data starts at odd multiples of 512 bytes.
    fs::create_dir_all(pgdata.join("base/16384")).unwrap();
    fs::write(pgdata.join("PG_VERSION"), "15\n").unwrap();
    let rel = pgdata.join("base/16384/16397");
    let mut pages = datagen::db_pages(21, 512); // 4 MiB
    fs::write(&rel, &pages).unwrap();
    // A member before it that grows between the backups: the relation file's data moves.
    let grows = pgdata.join("base/16384/1000");
    fs::write(&grows, vec![7u8; 3000]).unwrap();
    // A relation file with a name longer than a ustar header holds (GNU tar writes an `L` member).
    let long_dir = pgdata.join(format!("base/16384/{}", "t".repeat(110)));
    fs::create_dir_all(&long_dir).unwrap();
    fs::write(long_dir.join("16400"), datagen::db_pages(22, 64)).unwrap();
    // A sparse file after them: the scan stops there with a warning, the tar still round-trips.
    let sparse = fs::File::create(pgdata.join("zz_sparse")).unwrap();
    sparse.set_len(1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&sparse, b"end", (1 << 20) - 3).unwrap();
    fs::create_dir_all(&src).unwrap();
    let tar = || {
        let status = std::process::Command::new("tar")
            .args(["--sort=name", "--format=gnu", "-S", "-cf"])
            .arg(src.join("base.tar"))
            .arg("-C")
            .arg(&pgdata)
            .args(["PG_VERSION", "base", "zz_sparse"])
            .status()
            .unwrap();
        assert!(status.success());
    };
    tar();
    let full = ok(&["backup", "--repo", s(&repo), s(&src), "--json"]);
    let events = text(&full.stdout);
    assert!(
        events.contains("\"warning\"") && events.contains("base.tar") && events.contains("sparse member"),
        "{events}"
    );
    assert_eq!(full.status.code(), Some(0));

    // Not in the member's first block: a changed block before the first unchanged one of a
    // moved member has no known parent version and is stored whole.
    let changed: Vec<usize> = (1..=20).map(|i| 8 + i * 25).collect();
    for &p in &changed {
        pages[p * datagen::PAGE..(p + 1) * datagen::PAGE].copy_from_slice(&datagen::db_pages(1000 + p as u64, 1));
    }
    fs::write(&rel, &pages).unwrap();
    fs::write(&grows, vec![7u8; 4000]).unwrap(); // 6 blocks of 512 bytes to 8
    tar();
    let before = dir_size(&repo.join("packs"));
    ok(&["backup", "--repo", s(&repo), s(&src)]);
    let added = dir_size(&repo.join("packs")) - before;
    // The changed pages, the members' headers, the grown member and the chunk lists.
    let bound = compressed_pages(&pages, &changed) * 3 / 2;
    eprintln!("tar: 20 changed pages added {added} bytes of packs, bound {bound}");
    assert!(added <= bound, "20 changed pages in a tar added {added} bytes of packs, more than {bound}");
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));

    // Chunked by content, the same tar costs far more.
    let cdc_repo = tmp.path().join("cdc");
    init_small(&cdc_repo);
    fs::write(&rel, datagen::db_pages(21, 512)).unwrap();
    tar();
    ok(&["backup", "--repo", s(&cdc_repo), s(&src), "--chunking", "cdc"]);
    fs::write(&rel, &pages).unwrap();
    tar();
    let before = dir_size(&cdc_repo.join("packs"));
    ok(&["backup", "--repo", s(&cdc_repo), s(&src), "--chunking", "cdc"]);
    let cdc = dir_size(&cdc_repo.join("packs")) - before;
    assert!(cdc > 2 * added, "cdc {cdc} bytes vs {added} with page blocks");
}

#[test]
fn a_directory_too_large_for_one_tree_blob_backs_up_restores_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    init_small(&repo);
    // 700,000 entries with long names: their tree is ~87 MB, more than the 64 MiB a blob may
    // be, so it is stored as pieces and an index. A few carry content.
    let wide = src.join("wide");
    fs::create_dir_all(&wide).unwrap();
    for i in 0..700_000 {
        let file = wide.join(format!("entry-{i:060}"));
        if i % 100_000 == 7 {
            fs::write(&file, format!("content of {i}").repeat(1000)).unwrap();
        } else {
            fs::File::create(file).unwrap();
        }
    }
    let first = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    assert_eq!(first["files"], 700_000);
    // Unchanged, the next backup reuses every file through the split parent tree.
    let second = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    assert_eq!(second["bytes_new"], 0, "{second}");
    let listed = ok(&["ls", "latest", "--repo", s(&repo)]);
    assert_eq!(text(&listed.stdout).lines().filter(|l| l.contains("/wide/entry-")).count(), 700_000);
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
    ok(&["verify", "--repo", s(&repo), "--read-data"]);
}

#[test]
fn restore_never_writes_through_a_symlink_out_of_its_target() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, target, elsewhere) =
        (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("target"), tmp.path().join("elsewhere"));
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/inner.txt"), b"inner").unwrap();
    fs::write(src.join("top.txt"), b"top").unwrap();
    fs::create_dir_all(&elsewhere).unwrap();
    fs::write(elsewhere.join("victim"), b"untouched").unwrap();
    ok(&["init", "--repo", s(&repo)]);
    ok(&["backup", "--repo", s(&repo), s(&src)]);
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&target)]);
    // Plant links where the snapshot has a directory and a file: an earlier restore (or
    // someone with access to the target) left them.
    let restored = target.join(src.strip_prefix("/").unwrap());
    fs::remove_dir_all(restored.join("d")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, restored.join("d")).unwrap();
    fs::remove_file(restored.join("top.txt")).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("victim"), restored.join("top.txt")).unwrap();
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&target)]);
    assert_eq!(fs::read(elsewhere.join("victim")).unwrap(), b"untouched");
    assert!(!elsewhere.join("inner.txt").exists(), "written through the directory link");
    assert!(fs::symlink_metadata(restored.join("d")).unwrap().is_dir(), "the link was replaced by a directory");
    assert_same_tree(&src, &restored);
    // A directory where the snapshot has a file is refused by name, not merged into.
    fs::remove_file(restored.join("top.txt")).unwrap();
    fs::create_dir(restored.join("top.txt")).unwrap();
    let out = cbcr(&["restore", "latest", "--repo", s(&repo), "--target", s(&target)]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("top.txt: a directory is where the snapshot has a file"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn mtimes_round_trip_to_the_end_of_the_format_and_are_clamped_beyond() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    fs::create_dir_all(&src).unwrap();
    // 2262-04-11: the last second 64-bit nanoseconds hold; 2300: past it; 1970 - 100 years.
    let cases = [("late", 9_223_372_035, 999_999_999), ("past", 10_413_792_000, 0), ("early", -3_155_760_000, 5)];
    for (name, secs, nanos) in cases {
        let path = src.join(name);
        fs::write(&path, name).unwrap();
        filetime::set_file_mtime(&path, filetime::FileTime::from_unix_time(secs, nanos)).unwrap();
    }
    ok(&["init", "--repo", s(&repo)]);
    ok(&["backup", "--repo", s(&repo), s(&src)]);
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    let restored = out.join(src.strip_prefix("/").unwrap());
    let mtime = |dir: &Path, name: &str| {
        let md = fs::metadata(dir.join(name)).unwrap();
        (md.mtime(), md.mtime_nsec())
    };
    // As the source's file system holds them (some clamp early times to 32 bits themselves).
    assert_eq!(mtime(&src, "late"), (9_223_372_035, 999_999_999), "this file system holds 2262");
    assert_eq!(mtime(&restored, "late"), mtime(&src, "late"), "the end of the range, exactly");
    assert_eq!(mtime(&restored, "early"), mtime(&src, "early"));
    if mtime(&src, "past").0 == 10_413_792_000 {
        // Clamped to the range's end, not wrapped to 1901.
        assert_eq!(mtime(&restored, "past"), (9_223_372_036, 854_775_807));
    }
}

#[test]
fn forget_removes_the_snapshots_named_and_keeps_their_data_for_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    make_tree(&src, 51, 200_000);
    ok(&["init", "--repo", s(&repo)]);
    let first = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    let second = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    let first_id = first["snapshot_id"].as_str().unwrap();
    let refused = cbcr(&["forget", "latest", "--repo", s(&repo)]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    let gone = last_json(&ok(&["forget", &first_id[..12], "--repo", s(&repo), "--json"]));
    assert_eq!(gone["id"].as_str(), Some(first_id));
    assert_eq!(snapshot_count(&repo), 1);
    let missing = cbcr(&["forget", first_id, "--repo", s(&repo)]);
    assert!(!missing.status.success() && text(&missing.stderr).contains("no snapshot matches"));
    ok(&["restore", second["snapshot_id"].as_str().unwrap(), "--repo", s(&repo), "--target", s(&out)]);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
    ok(&["verify", "--read-data", "--repo", s(&repo)]);
}

/// Every path below `root`, relative to it, sorted.
fn paths_below(root: &Path) -> Vec<String> {
    let mut all = vec![];
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            all.push(e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    all.sort();
    all
}

#[test]
fn excludes_leave_out_what_the_patterns_and_postgresql_rules_name_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("2026-12-01"), tmp.path().join("repo"), tmp.path().join("out"));
    init_small(&repo);
    // A PostgreSQL data directory (as a cold copy holds it) next to application files.
    let pg = src.join("pg");
    for (file, bytes) in [
        ("PG_VERSION", &b"15\n"[..]),
        ("postmaster.pid", b"4242\n"),
        ("postmaster.opts", b"postgres\n"),
        ("backup_label", b"START WAL LOCATION\n"),
        ("global/pg_control", &[7; 8192]),
        ("global/pg_internal.init", &[1; 100]),
        ("base/5/16397", &[3; 8192]),
        ("base/pgsql_tmp/pgsql_tmp12.0", &[4; 100]),
        ("pg_stat_tmp/global.stat", &[5; 100]),
        ("pg_replslot/standby1/state", &[6; 100]),
        ("pg_wal/000000010000000000000001", &[8; 4096]),
    ] {
        fs::create_dir_all(pg.join(file).parent().unwrap()).unwrap();
        fs::write(pg.join(file), bytes).unwrap();
    }
    for file in ["app/run.log", "app/keep.logs", "app/cache/a", "app/data.db", "notes.txt"] {
        fs::create_dir_all(src.join(file).parent().unwrap()).unwrap();
        fs::write(src.join(file), file).unwrap();
    }
    let rules = tmp.path().join("rules");
    fs::write(&rules, format!("# the application's cache\n\n{}/app/cache\n", src.display())).unwrap();
    let backup =
        ok(&["backup", "--repo", s(&repo), s(&src), "--exclude", "*.log", "--exclude-file", s(&rules), "--json"]);
    let summary = last_json(&backup);
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    let restored = paths_below(&out.join(src.strip_prefix("/").unwrap()));
    let want: Vec<&str> = vec![
        "app",
        "app/data.db",
        "app/keep.logs",
        "notes.txt",
        "pg",
        "pg/PG_VERSION",
        "pg/backup_label",
        "pg/base",
        "pg/base/5",
        "pg/base/5/16397",
        "pg/global",
        "pg/global/pg_control",
        "pg/pg_replslot",
        "pg/pg_stat_tmp",
        "pg/pg_wal",
        "pg/pg_wal/000000010000000000000001",
    ];
    assert_eq!(restored, want);
    // run.log, cache, postmaster.pid and .opts, pg_internal.init, pgsql_tmp, global.stat, standby1.
    assert_eq!(summary["excluded"], 8, "{summary}");

    // Without PostgreSQL's rules everything but the patterns' matches is kept.
    let all = ok(&["backup", "--repo", s(&repo), s(&src), "--no-default-excludes", "--json"]);
    assert_eq!(last_json(&all)["excluded"], 0);

    // A typo in a rules file's path or a pattern that is not one: a usage error naming it,
    // nothing committed.
    let before = snapshot_count(&repo);
    let missing = tmp.path().join("no-such-rules");
    let bad = cbcr(&["backup", "--repo", s(&repo), s(&src), "--exclude-file", s(&missing)]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    assert!(text(&bad.stderr).contains("no-such-rules"), "{}", text(&bad.stderr));
    fs::write(&rules, "*.log\n[a-\n").unwrap();
    let bad = cbcr(&["backup", "--repo", s(&repo), s(&src), "--exclude-file", s(&rules)]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    assert!(text(&bad.stderr).contains(&format!("{}:2", rules.display())), "{}", text(&bad.stderr));
    assert_eq!(snapshot_count(&repo), before);
}

/// Runs cbcr with `args` and the file `input` as its standard input.
fn cbcr_reading(input: &Path, args: &[&str]) -> std::process::Output {
    let stdin = fs::File::open(input).unwrap();
    cbcr_command().args(args).stdin(stdin).output().unwrap()
}

#[test]
fn a_tar_stream_on_stdin_is_chunked_as_the_same_tar_file_is_and_its_incremental_stores_the_changed_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let (pgdata, repo, out) = (tmp.path().join("pgdata"), tmp.path().join("repo"), tmp.path().join("out"));
    // 8 MiB segments, read in pieces of 4 MiB: the stream crosses segments, and the relation
    // file's region crosses a segment boundary.
    ok(&["init", "--repo", s(&repo), "--segment-size", "8MiB"]);
    fs::create_dir_all(pgdata.join("base/16384")).unwrap();
    fs::write(pgdata.join("PG_VERSION"), "15\n").unwrap();
    fs::write(pgdata.join("base/16384/1000"), vec![7u8; 3000]).unwrap();
    let rel = pgdata.join("base/16384/16397");
    let mut pages = datagen::db_pages(31, 1536); // 12 MiB
    fs::write(&rel, &pages).unwrap();
    let tar = |to: &Path| {
        let status = std::process::Command::new("tar")
            .args(["--sort=name", "--format=gnu", "-cf"])
            .arg(to)
            .arg("-C")
            .arg(&pgdata)
            .args(["PG_VERSION", "base"])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let (day1, day2) = (tmp.path().join("day1"), tmp.path().join("day2"));
    fs::create_dir_all(&day1).unwrap();
    tar(&day1.join("base.tar"));
    // The same tar as a file, then as a stream: the stream's chunks are the file's.
    ok(&["backup", "--repo", s(&repo), s(&day1)]);
    let streamed = cbcr_reading(
        &day1.join("base.tar"),
        &["backup", "--repo", s(&repo), "--db", "pg1", "--stdin", "base.tar", "--json"],
    );
    assert!(streamed.status.success(), "{}", text(&streamed.stderr));
    let first = last_json(&streamed);
    assert_eq!(first["chunks_new"], 0, "the stream chunked differently from the file: {first}");
    assert_eq!(first["page_files"]["postgresql"], 1, "{first}");
    assert_eq!(first["bytes_total"], fs::metadata(day1.join("base.tar")).unwrap().len());

    let changed: Vec<usize> = (1..=20).map(|i| 8 + i * 75).collect();
    for &p in &changed {
        pages[p * datagen::PAGE..(p + 1) * datagen::PAGE].copy_from_slice(&datagen::db_pages(2000 + p as u64, 1));
    }
    fs::write(&rel, &pages).unwrap();
    fs::create_dir_all(&day2).unwrap();
    tar(&day2.join("base.tar"));
    let before = dir_size(&repo.join("packs"));
    let next = cbcr_reading(
        &day2.join("base.tar"),
        &["backup", "--repo", s(&repo), "--db", "pg1", "--stdin", "base.tar", "--json"],
    );
    assert!(next.status.success(), "{}", text(&next.stderr));
    assert_eq!(last_json(&next)["parent"], first["snapshot_id"]);
    let added = dir_size(&repo.join("packs")) - before;
    let bound = compressed_pages(&pages, &changed) * 3 / 2;
    assert!(added <= bound, "20 changed pages streamed as a tar added {added} bytes of packs, more than {bound}");
    ok(&["restore", "latest", "--db", "pg1", "--repo", s(&repo), "--target", s(&out)]);
    assert_eq!(fs::read(out.join("base.tar")).unwrap(), fs::read(day2.join("base.tar")).unwrap());

    // An empty stream is an empty file; a name that is not one path component, or a stream
    // with paths, is a usage error.
    let empty = tmp.path().join("empty");
    fs::write(&empty, b"").unwrap();
    let none = cbcr_reading(&empty, &["backup", "--repo", s(&repo), "--stdin", "nothing", "--json"]);
    assert!(none.status.success(), "{}", text(&none.stderr));
    assert_eq!(last_json(&none)["bytes_total"], 0);
    for args in [&["--stdin", "a/b"][..], &["--stdin", ".."], &["--stdin", "x", s(&day1)]] {
        let bad = cbcr_reading(&empty, &[&["backup", "--repo", s(&repo)], args].concat());
        assert_eq!(bad.status.code(), Some(2), "{args:?}: {}", text(&bad.stderr));
    }
}

#[test]
fn a_read_cap_holds_the_rate_and_a_steered_backup_takes_caps_on_stdin() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    init_small(&repo);
    // 24 MiB at 8 MiB/s: the first second's 8 MiB come at once, the rest take 2 s at least
    // (a lower bound only: a slow machine is slower, never faster).
    let started = std::time::Instant::now();
    let synth = "synth://pg?size=24MiB&seed=2";
    ok(&["backup", "--repo", s(&repo), "--read-cap", "8MiB", synth, "--cores", "2"]);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1900),
        "24 MiB at 8 MiB/s in {:?}",
        started.elapsed()
    );
    let bad = cbcr(&["backup", "--repo", s(&repo), "--read-cap", "fast", synth]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));

    // Steered: a cap line, then `none`; `reading` events report what was read under it.
    let mut child = cbcr_command()
        .args([
            "backup",
            "--repo",
            s(&repo),
            "--json",
            "--read-cap-stdin",
            "synth://pg?size=48MiB&seed=3",
            "--cores",
            "2",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    use std::io::Write;
    writeln!(stdin, "4MiB").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    writeln!(stdin, "none").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let readings: Vec<_> = events.iter().filter(|e| e["type"] == "reading").collect();
    assert!(readings.iter().any(|r| r["cap_bps"] == 4 << 20), "a reading under the cap: {readings:?}");
    assert!(readings.iter().all(|r| r["read_p99_ms"].is_number() && r["bytes"].is_u64()), "{readings:?}");
    assert_eq!(events.last().unwrap()["type"], "summary");
    assert!(events.last().unwrap()["bytes_read"].as_u64().unwrap() >= 48 << 20, "{:?}", events.last());
    ok(&["verify", "--repo", s(&repo), "--read-data"]);
}
