//! Snapshot assembly: a snapshot's trees built from per-segment results (which chunk list each
//! segment of each file got) and the metadata of every entry. Pure: no I/O, no channels, no
//! clock; storing a finished tree is the caller's `store` callback, which returns its id.
//!
//! [`dir_tree`] builds one directory; the backup's walker calls it for each directory as soon
//! as that directory's files are done (post-order, so memory stays bounded). [`combine`]
//! builds a whole snapshot from results gathered in any order, for instance from the shards of
//! one backup run on several hosts.

use std::collections::{BTreeMap, HashMap};

use crate::tree::{encode_index, Metadata, Node, NodeKind, Tree};
use crate::{limits, ChunkId};

/// Why a snapshot could not be assembled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssemblyError {
    #[error("{path}: segment {segment} of {segments} has no result")]
    MissingSegment { path: String, segment: usize, segments: usize },
    #[error("{path}: segment {segment} has two results")]
    DuplicateSegment { path: String, segment: u32 },
    #[error("a result names segment {segment} of entry {file}, which is not a file of that many segments")]
    UnknownSegment { file: usize, segment: u32 },
    #[error("{path}: the name occurs twice in its directory")]
    DuplicateName { path: String },
    #[error("{path}: its parent is not a directory of the snapshot")]
    NoParent { path: String },
    #[error(
        "{path}: {entries} entries, more than one directory may hold ({max_entries}); split the directory, or back up its parent without it"
    )]
    TooWide { path: String, entries: usize, max_entries: u32 },
    #[error("{path}: its record in the directory's tree is larger than a blob may be ({max_mib} MiB)")]
    EntryTooLarge { path: String, max_mib: u32 },
}

/// One entry of a directory being assembled.
pub enum DirEntry {
    /// Complete already (a symlink, an unchanged file, a subdirectory's node).
    Node(Node),
    /// A file and the chunk-list id of each of its segments, as results arrived.
    File { name: Vec<u8>, meta: Metadata, segments: Vec<Option<ChunkId>> },
}

/// The encoded tree of one directory: one blob, or (a directory too large for one blob) its
/// pieces, whose index is stored after them.
#[derive(Debug)]
pub struct TreeBlobs(Vec<Vec<u8>>);

impl TreeBlobs {
    /// Stores the blobs through `store` (given each encoding, returns its id); returns the id
    /// the directory's node names: the tree's, or its index's.
    pub fn store<E>(self, mut store: impl FnMut(&[u8]) -> Result<ChunkId, E>) -> Result<ChunkId, E> {
        if let [whole] = &self.0[..] {
            return store(whole);
        }
        let ids = self.0.iter().map(|piece| store(piece)).collect::<Result<Vec<_>, E>>()?;
        store(&encode_index(&ids))
    }
}

/// The tree of the directory at `path` (for messages), encoded, checked against the bounds of
/// the format: every segment has its result, names are unique, the directory holds at most
/// [`limits::MAX_TREE_NODES`] entries; a tree larger than a blob is split.
pub fn dir_tree(path: &str, entries: Vec<DirEntry>) -> Result<TreeBlobs, AssemblyError> {
    dir_tree_in_blobs_of(path, entries, limits::MAX_BLOB_SIZE as usize)
}

fn dir_tree_in_blobs_of(path: &str, entries: Vec<DirEntry>, max_blob: usize) -> Result<TreeBlobs, AssemblyError> {
    let mut nodes = Vec::with_capacity(entries.len());
    for entry in entries {
        nodes.push(match entry {
            DirEntry::Node(node) => node,
            DirEntry::File { name, meta, segments } => {
                let count = segments.len();
                let segments = segments
                    .into_iter()
                    .enumerate()
                    .map(|(segment, list)| {
                        list.ok_or_else(|| AssemblyError::MissingSegment {
                            path: join(path, &name),
                            segment,
                            segments: count,
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Node { name, meta, kind: NodeKind::File { segments } }
            }
        });
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = nodes.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(AssemblyError::DuplicateName { path: join(path, &w[0].name) });
    }
    if nodes.len() > limits::MAX_TREE_NODES as usize {
        return Err(AssemblyError::TooWide {
            path: path.to_owned(),
            entries: nodes.len(),
            max_entries: limits::MAX_TREE_NODES,
        });
    }
    let tree = Tree { nodes };
    match tree.encode_pieces(max_blob) {
        Ok(blobs) => Ok(TreeBlobs(blobs)),
        Err(node) => {
            Err(AssemblyError::EntryTooLarge { path: join(path, &node.name), max_mib: (max_blob >> 20) as u32 })
        }
    }
}

fn join(dir: &str, name: &[u8]) -> String {
    format!("{}/{}", dir.trim_end_matches('/'), String::from_utf8_lossy(name))
}

/// An entry of a whole snapshot, by its path below the snapshot's root.
pub struct Entry {
    /// Path components (raw names), the root's children having one.
    pub path: Vec<Vec<u8>>,
    pub meta: Metadata,
    pub kind: EntryKind,
}

pub enum EntryKind {
    /// A file of this many segments (each gets one [`SegmentResult`]).
    File {
        segments: u32,
    },
    Dir,
    Symlink {
        target: Vec<u8>,
    },
}

/// What one segment of one file became: `file` indexes the entries given to [`combine`].
#[derive(Clone, Copy, Debug)]
pub struct SegmentResult {
    pub file: usize,
    pub segment: u32,
    pub list: ChunkId,
}

/// Builds every tree of a snapshot from its entries and the results of their segments, in any
/// order, deepest directories first; `store` is given each tree's encoding and returns its id.
/// Returns the root tree's id. The same entries and results give the same root, whatever
/// the order the results came in.
pub fn combine<E>(
    entries: &[Entry],
    results: &[SegmentResult],
    mut store: impl FnMut(&[u8]) -> Result<ChunkId, E>,
) -> Result<Result<ChunkId, E>, AssemblyError> {
    let show = |path: &[Vec<u8>]| {
        let parts: Vec<_> = path.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
        format!("/{}", parts.join("/"))
    };
    let mut segments: HashMap<usize, Vec<Option<ChunkId>>> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if let EntryKind::File { segments: n } = e.kind {
            segments.insert(i, vec![None; n as usize]);
        }
    }
    for r in results {
        let slot = segments
            .get_mut(&r.file)
            .and_then(|s| s.get_mut(r.segment as usize))
            .ok_or(AssemblyError::UnknownSegment { file: r.file, segment: r.segment })?;
        if slot.replace(r.list).is_some() {
            return Err(AssemblyError::DuplicateSegment { path: show(&entries[r.file].path), segment: r.segment });
        }
    }
    // Each directory's entries, keyed by its path; the root is the empty path.
    let mut dirs: BTreeMap<Vec<Vec<u8>>, Vec<DirEntry>> = BTreeMap::new();
    dirs.insert(vec![], vec![]);
    let mut dir_meta: HashMap<Vec<Vec<u8>>, Metadata> = HashMap::new();
    for e in entries.iter().filter(|e| matches!(e.kind, EntryKind::Dir)) {
        dirs.entry(e.path.clone()).or_default();
        dir_meta.insert(e.path.clone(), e.meta);
    }
    for (i, e) in entries.iter().enumerate() {
        let Some((name, parent)) = e.path.split_last() else { continue };
        let Some(siblings) = dirs.get_mut(parent) else {
            return Err(AssemblyError::NoParent { path: show(&e.path) });
        };
        match &e.kind {
            EntryKind::File { .. } => siblings.push(DirEntry::File {
                name: name.clone(),
                meta: e.meta,
                segments: segments.remove(&i).unwrap_or_default(),
            }),
            EntryKind::Symlink { target } => siblings.push(DirEntry::Node(Node {
                name: name.clone(),
                meta: e.meta,
                kind: NodeKind::Symlink { target: target.clone() },
            })),
            // Added to its parent once its own tree is stored.
            EntryKind::Dir => {}
        }
    }
    // Deepest first, so a directory's subdirectories are stored before it.
    let mut order: Vec<Vec<Vec<u8>>> = dirs.keys().cloned().collect();
    order.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for path in order {
        let entries = dirs.remove(&path).expect("listed above");
        let id = match dir_tree(&show(&path), entries)?.store(&mut store) {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        let Some((name, parent)) = path.split_last() else { return Ok(Ok(id)) };
        let node = Node { name: name.clone(), meta: dir_meta[&path], kind: NodeKind::Dir { tree: id } };
        dirs.get_mut(parent).ok_or_else(|| AssemblyError::NoParent { path: show(&path) })?.push(DirEntry::Node(node));
    }
    unreachable!("the root, the shortest path, is stored last and returns")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::TreeBlob;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn meta(size: u64) -> Metadata {
        Metadata { mode: 0o100644, size, ..Default::default() }
    }

    /// `/a/f` (3 segments), `/a/b/g` (1), `/a/b/link`, `/top` (2), `/empty/`.
    fn snapshot() -> (Vec<Entry>, Vec<SegmentResult>) {
        let p = |s: &str| s.split('/').map(|c| c.as_bytes().to_vec()).collect::<Vec<_>>();
        let dir = |s: &str| Entry {
            path: p(s),
            meta: Metadata { mode: 0o40755, ..Default::default() },
            kind: EntryKind::Dir,
        };
        let file =
            |s: &str, n| Entry { path: p(s), meta: meta(u64::from(n) * 10), kind: EntryKind::File { segments: n } };
        let entries = vec![
            dir("a"),
            file("a/f", 3),
            dir("a/b"),
            file("a/b/g", 1),
            Entry { path: p("a/b/link"), meta: meta(0), kind: EntryKind::Symlink { target: b"../f".to_vec() } },
            file("top", 2),
            dir("empty"),
        ];
        let results = vec![
            SegmentResult { file: 1, segment: 0, list: id(10) },
            SegmentResult { file: 1, segment: 1, list: id(11) },
            SegmentResult { file: 1, segment: 2, list: id(12) },
            SegmentResult { file: 3, segment: 0, list: id(30) },
            SegmentResult { file: 5, segment: 0, list: id(50) },
            SegmentResult { file: 5, segment: 1, list: id(51) },
        ];
        (entries, results)
    }

    /// A store that keeps trees by a hash of their bytes.
    fn store(trees: &mut HashMap<ChunkId, Tree>) -> impl FnMut(&[u8]) -> Result<ChunkId, ()> + '_ {
        move |bytes| {
            let id = ChunkId::of_file(bytes);
            trees.insert(id, Tree::decode(bytes).unwrap());
            Ok(id)
        }
    }

    #[test]
    fn results_in_any_order_make_the_same_snapshot() {
        let (entries, mut results) = snapshot();
        let mut trees = HashMap::new();
        let root = combine(&entries, &results, store(&mut trees)).unwrap().unwrap();
        // As shards on several hosts would deliver them: reversed, interleaved.
        results.reverse();
        results.swap(1, 4);
        let mut again = HashMap::new();
        assert_eq!(combine(&entries, &results, store(&mut again)).unwrap().unwrap(), root);

        let names =
            |t: &Tree| t.nodes.iter().map(|n| String::from_utf8_lossy(&n.name).into_owned()).collect::<Vec<_>>();
        let top = &trees[&root];
        assert_eq!(names(top), ["a", "empty", "top"], "sorted by name");
        let NodeKind::Dir { tree: a } = top.nodes[0].kind else { panic!() };
        assert_eq!(names(&trees[&a]), ["b", "f"]);
        assert_eq!(trees[&a].nodes[1].kind, NodeKind::File { segments: vec![id(10), id(11), id(12)] });
        let NodeKind::Dir { tree: b } = trees[&a].nodes[0].kind else { panic!() };
        assert_eq!(names(&trees[&b]), ["g", "link"]);
        let NodeKind::Dir { tree: empty } = top.nodes[1].kind else { panic!() };
        assert!(trees[&empty].nodes.is_empty());
        assert_eq!(top.nodes[2].kind, NodeKind::File { segments: vec![id(50), id(51)] });
        assert_eq!(trees.len(), 4, "one tree per directory, the root included");
    }

    #[test]
    fn missing_duplicate_and_stray_results_are_named() {
        let (entries, results) = snapshot();
        let mut trees = HashMap::new();
        let missing = combine(&entries, &results[1..], store(&mut trees)).unwrap_err();
        assert_eq!(missing, AssemblyError::MissingSegment { path: "/a/f".into(), segment: 0, segments: 3 });
        let twice = [results.clone(), vec![results[3]]].concat();
        assert_eq!(
            combine(&entries, &twice, store(&mut trees)).unwrap_err(),
            AssemblyError::DuplicateSegment { path: "/a/b/g".into(), segment: 0 }
        );
        let stray = [results.clone(), vec![SegmentResult { file: 0, segment: 0, list: id(1) }]].concat();
        assert_eq!(
            combine(&entries, &stray, store(&mut trees)).unwrap_err(),
            AssemblyError::UnknownSegment { file: 0, segment: 0 }
        );
        let beyond = [results.clone(), vec![SegmentResult { file: 3, segment: 1, list: id(1) }]].concat();
        assert!(matches!(combine(&entries, &beyond, store(&mut trees)), Err(AssemblyError::UnknownSegment { .. })));
        let orphan = Entry { path: vec![b"nodir".to_vec(), b"x".to_vec()], meta: meta(0), kind: EntryKind::Dir };
        let mut with_orphan = snapshot().0;
        with_orphan.push(orphan);
        assert!(matches!(combine(&with_orphan, &results, store(&mut trees)), Err(AssemblyError::NoParent { .. })));
    }

    #[test]
    fn a_store_that_fails_stops_the_assembly() {
        let (entries, results) = snapshot();
        let mut calls = 0;
        let failed = combine(&entries, &results, |_| {
            calls += 1;
            if calls == 2 {
                Err("disk full")
            } else {
                Ok(id(calls))
            }
        });
        assert_eq!(failed, Ok(Err("disk full")));
        assert_eq!(calls, 2);
    }

    #[test]
    fn one_directory_is_checked_against_the_format_bounds() {
        let file = |name: &str, segments| DirEntry::File { name: name.into(), meta: meta(1), segments };
        let blobs = dir_tree("/d", vec![file("b", vec![Some(id(1))]), file("a", vec![])]).unwrap();
        let mut stored = vec![];
        blobs
            .store(|b| {
                stored.push(b.to_vec());
                Ok::<_, ()>(id(0))
            })
            .unwrap();
        let [tree] = &stored[..] else { panic!("one blob for a small directory") };
        let names: Vec<_> = Tree::decode(tree).unwrap().nodes.into_iter().map(|n| n.name).collect();
        assert_eq!(names, [b"a".to_vec(), b"b".to_vec()], "sorted");
        assert_eq!(
            dir_tree("/d", vec![file("x", vec![Some(id(1)), None])]).unwrap_err(),
            AssemblyError::MissingSegment { path: "/d/x".into(), segment: 1, segments: 2 }
        );
        assert_eq!(
            dir_tree("/d/", vec![file("x", vec![]), file("x", vec![])]).unwrap_err(),
            AssemblyError::DuplicateName { path: "/d/x".into() }
        );
        let huge = file("huge", vec![Some(id(1)); 100]);
        assert_eq!(
            dir_tree_in_blobs_of("/d", vec![huge], 1024).unwrap_err(),
            AssemblyError::EntryTooLarge { path: "/d/huge".into(), max_mib: 0 }
        );
    }

    #[test]
    fn a_directory_larger_than_a_blob_is_stored_as_pieces_and_an_index() {
        let file = |i: u32| DirEntry::File { name: format!("file-{i:06}").into(), meta: meta(1), segments: vec![] };
        let entries = || (0..1000).rev().map(file).collect::<Vec<_>>();
        let blobs = dir_tree_in_blobs_of("/wide", entries(), 4096).unwrap();
        let mut stored: HashMap<ChunkId, Vec<u8>> = HashMap::new();
        let keep = |stored: &mut HashMap<ChunkId, Vec<u8>>, b: &[u8]| {
            assert!(b.len() <= 4096);
            let id = ChunkId::of_file(b);
            stored.insert(id, b.to_vec());
            Ok::<_, ()>(id)
        };
        let root = blobs.store(|b| keep(&mut stored, b)).unwrap();
        let TreeBlob::Pieces(pieces) = TreeBlob::decode(&stored[&root]).unwrap() else { panic!("an index") };
        assert!(pieces.len() > 10, "{} pieces", pieces.len());
        let pieces: Vec<Tree> = pieces.iter().map(|p| Tree::decode(&stored[p]).unwrap()).collect();
        let tree = Tree::join(pieces.clone()).unwrap();
        let names: Vec<String> = tree.nodes.iter().map(|n| String::from_utf8_lossy(&n.name).into_owned()).collect();
        assert_eq!(names, (0..1000).map(|i| format!("file-{i:06}")).collect::<Vec<_>>());
        // The same directory splits the same way (dedup across snapshots).
        let again = dir_tree_in_blobs_of("/wide", entries(), 4096).unwrap();
        assert_eq!(again.store(|b| keep(&mut stored, b)).unwrap(), root);
        // Pieces out of order are refused.
        assert!(Tree::join(pieces.into_iter().rev().collect()).is_err());
    }
}
