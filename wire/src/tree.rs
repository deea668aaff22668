//! Trees (one directory each) and chunk lists (the chunks of one segment of one file).
//!
//! Both are blobs stored in packs like file content, so the metadata of a huge snapshot is
//! streamed and deduplicated like data. A file's content is a list of chunk-list ids, one per
//! segment: the chunk list of a 1 TiB file is never one allocation, and segments are the unit
//! that restore spreads over cores.
//!
//! ```text
//! tree:       "CBTR" version:u16 0:u16 count:u32 node*            (nodes ascending by name)
//! node:       kind:u8 name_len:u16 name mode:u32 uid:u32 gid:u32 size:u64
//!             mtime_ns:i64 ctime_ns:i64 inode:u64 dev:u64 body
//! body:       file: segments:u32 id*  |  dir: subtree id  |  symlink: len:u16 target
//! chunk list: "CBCL" version:u16 0:u16 count:u32 (id len:u32 flags:u32)*
//! tree index: "CBTR" 2:u16 0:u16 count:u32 id*                   (count >= 2)
//! ```
//!
//! A directory whose tree would be larger than a blob may be (hundreds of thousands of
//! entries) is stored as pieces, each a version-1 tree of consecutive names, and a tree index
//! naming them in order; its node in the parent names the index. [`TreeBlob::decode`] reads
//! either; [`Tree::join`] puts the pieces back together.

use crate::codec::{self, Reader};
use crate::{limits, ChunkId, Result};

const TREE_MAGIC: &[u8; 4] = b"CBTR";
const LIST_MAGIC: &[u8; 4] = b"CBCL";
/// Version of the tree and chunk-list encodings.
pub const VERSION: u16 = 1;
/// The version field that marks a tree index.
pub const INDEX_VERSION: u16 = 2;
const HEADER_LEN: usize = 12;

/// File metadata recorded for every node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Permission and type bits as `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// File length in bytes (0 for directories).
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
    pub dev: u64,
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A regular file: one chunk-list blob id per segment, in order.
    File { segments: Vec<ChunkId> },
    /// A directory: the id of its tree blob.
    Dir { tree: ChunkId },
    /// A symbolic link and its raw target bytes.
    Symlink { target: Vec<u8> },
}

/// One entry of a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Raw file-name bytes (Unix names need not be UTF-8).
    pub name: Vec<u8>,
    pub meta: Metadata,
    pub kind: NodeKind,
}

/// One directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    /// Children, strictly ascending by name.
    pub nodes: Vec<Node>,
}

const KIND_FILE: u8 = 1;
const KIND_DIR: u8 = 2;
const KIND_SYMLINK: u8 = 3;
const NODE_FIXED_LEN: usize = 1 + 2 + 4 * 3 + 8 * 5;

impl Tree {
    /// Encodes the tree; sorts the nodes by name first so that equal directories encode equally.
    pub fn encode(mut self) -> Vec<u8> {
        self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        assert!(self.nodes.len() <= limits::MAX_TREE_NODES as usize);
        let mut out = Vec::with_capacity(HEADER_LEN + self.nodes.len() * 128);
        codec::preamble(&mut out, TREE_MAGIC, VERSION);
        out.extend_from_slice(&(self.nodes.len() as u32).to_le_bytes());
        for n in &self.nodes {
            encode_node(n, &mut out);
        }
        out
    }

    /// The tree as blobs of at most `max_len` bytes each: its plain encoding when that fits,
    /// else pieces of consecutive nodes (sorted first), to be stored and named by an
    /// [`encode_index`]. Fails with the node that alone is larger than `max_len`.
    pub fn encode_pieces(mut self, max_len: usize) -> std::result::Result<Vec<Vec<u8>>, Node> {
        self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let flush = |pieces: &mut Vec<Vec<u8>>, body: &mut Vec<u8>, count: &mut u32| {
            let mut piece = Vec::with_capacity(HEADER_LEN + body.len());
            codec::preamble(&mut piece, TREE_MAGIC, VERSION);
            piece.extend_from_slice(&count.to_le_bytes());
            piece.append(body);
            pieces.push(piece);
            *count = 0;
        };
        let (mut pieces, mut body, mut count, mut node) = (vec![], Vec::new(), 0u32, Vec::new());
        for (at, n) in self.nodes.iter().enumerate() {
            node.clear();
            encode_node(n, &mut node);
            if HEADER_LEN + node.len() > max_len {
                return Err(self.nodes.swap_remove(at));
            }
            if HEADER_LEN + body.len() + node.len() > max_len || count == limits::MAX_TREE_NODES {
                flush(&mut pieces, &mut body, &mut count);
            }
            body.extend_from_slice(&node);
            count += 1;
        }
        if count > 0 || pieces.is_empty() {
            flush(&mut pieces, &mut body, &mut count);
        }
        Ok(pieces)
    }

    /// One tree from its pieces in order; names must ascend across them, as within each.
    pub fn join(pieces: Vec<Tree>) -> Result<Self> {
        let mut nodes: Vec<Node> = Vec::with_capacity(pieces.iter().map(|p| p.nodes.len()).sum());
        for piece in pieces {
            if let (Some(last), Some(first)) = (nodes.last(), piece.nodes.first()) {
                if last.name >= first.name {
                    return Err(crate::Error::Corrupt {
                        what: "tree",
                        detail: "the pieces of a split tree are not in name order".into(),
                    });
                }
            }
            nodes.extend(piece.nodes);
        }
        Ok(Self { nodes })
    }

    /// Decodes and validates a tree blob.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "tree");
        r.preamble(TREE_MAGIC, VERSION)?;
        let count = r.count(limits::MAX_TREE_NODES, NODE_FIXED_LEN)?;
        let mut nodes: Vec<Node> = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = r.u8()?;
            let name_len = r.u16()? as usize;
            let name = r.bytes(name_len)?.to_vec();
            if !valid_name(&name) {
                return Err(r.corrupt(format!("invalid file name {:?}", String::from_utf8_lossy(&name))));
            }
            if nodes.last().is_some_and(|prev| prev.name >= name) {
                return Err(r.corrupt("nodes are not strictly sorted by name".into()));
            }
            let meta = decode_meta(&mut r)?;
            let kind = match kind {
                KIND_FILE => {
                    let n = r.count(limits::MAX_FILE_SEGMENTS, 32)?;
                    let segments = (0..n).map(|_| r.array().map(ChunkId)).collect::<Result<_>>()?;
                    NodeKind::File { segments }
                }
                KIND_DIR => NodeKind::Dir { tree: ChunkId(r.array()?) },
                KIND_SYMLINK => {
                    let len = r.u16()? as usize;
                    if len > limits::MAX_LINK_TARGET_LEN {
                        return Err(r.corrupt(format!("symlink target of {len} bytes")));
                    }
                    NodeKind::Symlink { target: r.bytes(len)?.to_vec() }
                }
                other => return Err(r.corrupt(format!("unknown node kind {other}"))),
            };
            nodes.push(Node { name, meta, kind });
        }
        r.finish()?;
        Ok(Self { nodes })
    }

    /// The child called `name`, if any.
    pub fn find(&self, name: &[u8]) -> Option<&Node> {
        self.nodes.binary_search_by(|n| n.name.as_slice().cmp(name)).ok().map(|i| &self.nodes[i])
    }
}

/// Metadata as every encoding holds it: 56 bytes, fields in declaration order.
pub(crate) fn encode_meta(m: &Metadata, out: &mut Vec<u8>) {
    for v in [m.mode, m.uid, m.gid] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [m.size, m.mtime_ns as u64, m.ctime_ns as u64, m.inode, m.dev] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub(crate) fn decode_meta(r: &mut Reader<'_>) -> Result<Metadata> {
    Ok(Metadata {
        mode: r.u32()?,
        uid: r.u32()?,
        gid: r.u32()?,
        size: r.u64()?,
        mtime_ns: r.i64()?,
        ctime_ns: r.i64()?,
        inode: r.u64()?,
        dev: r.u64()?,
    })
}

fn encode_node(n: &Node, out: &mut Vec<u8>) {
    assert!(valid_name(&n.name), "invalid file name in tree");
    let kind = match n.kind {
        NodeKind::File { .. } => KIND_FILE,
        NodeKind::Dir { .. } => KIND_DIR,
        NodeKind::Symlink { .. } => KIND_SYMLINK,
    };
    out.push(kind);
    out.extend_from_slice(&(n.name.len() as u16).to_le_bytes());
    out.extend_from_slice(&n.name);
    encode_meta(&n.meta, out);
    match &n.kind {
        NodeKind::File { segments } => {
            out.extend_from_slice(&(segments.len() as u32).to_le_bytes());
            for s in segments {
                out.extend_from_slice(&s.0);
            }
        }
        NodeKind::Dir { tree } => out.extend_from_slice(&tree.0),
        NodeKind::Symlink { target } => {
            assert!(target.len() <= limits::MAX_LINK_TARGET_LEN);
            out.extend_from_slice(&(target.len() as u16).to_le_bytes());
            out.extend_from_slice(target);
        }
    }
}

/// The index of a split tree: its pieces' ids, in name order.
pub fn encode_index(pieces: &[ChunkId]) -> Vec<u8> {
    assert!((2..=limits::MAX_TREE_PIECES as usize).contains(&pieces.len()));
    let mut out = Vec::with_capacity(HEADER_LEN + pieces.len() * 32);
    codec::preamble(&mut out, TREE_MAGIC, INDEX_VERSION);
    out.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
    for id in pieces {
        out.extend_from_slice(&id.0);
    }
    out
}

/// A tree blob as stored: a whole directory, or the index of a split one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TreeBlob {
    Whole(Tree),
    /// The ids of the pieces, each a whole tree, in name order.
    Pieces(Vec<ChunkId>),
}

impl TreeBlob {
    /// Decodes either kind of tree blob, by its version field.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.get(..4) != Some(TREE_MAGIC) || bytes.get(4..6) != Some(&INDEX_VERSION.to_le_bytes()[..]) {
            return Tree::decode(bytes).map(TreeBlob::Whole);
        }
        let mut r = Reader::new(bytes, "tree index");
        r.preamble(TREE_MAGIC, INDEX_VERSION)?;
        let count = r.count(limits::MAX_TREE_PIECES, 32)?;
        if count < 2 {
            return Err(r.corrupt(format!("{count} pieces; a split tree has at least 2")));
        }
        let pieces = (0..count).map(|_| r.array().map(ChunkId)).collect::<Result<_>>()?;
        r.finish()?;
        Ok(TreeBlob::Pieces(pieces))
    }
}

fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= limits::MAX_NAME_LEN
        && name != b"."
        && name != b".."
        && !name.iter().any(|&b| b == b'/' || b == 0)
}

/// One chunk of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    /// The chunk's blob id; all zeros for a zero chunk, which is not stored.
    pub id: ChunkId,
    /// Raw length.
    pub len: u32,
    /// Every byte is zero: restore leaves a hole, nothing is stored.
    pub zero: bool,
}

/// The chunks of one segment of one file, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkList {
    pub chunks: Vec<ChunkRef>,
}

const FLAG_ZERO: u32 = 1;
const CHUNK_REF_LEN: usize = 40;

impl ChunkList {
    /// A segment of `len` bytes that restores as zeros (a hole): what `repair snapshots` puts
    /// in the place of a chunk list that was lost.
    pub fn holes(len: u64) -> Self {
        let max = u64::from(limits::MAX_BLOB_SIZE);
        let chunks = (0..len.div_ceil(max))
            .map(|i| ChunkRef { id: ChunkId::default(), len: (len - i * max).min(max) as u32, zero: true })
            .collect();
        Self { chunks }
    }

    /// This list with every chunk `lost` says is lost made a hole of the same length, so the
    /// file keeps its size and every other byte its offset; and the bytes made holes.
    pub fn with_holes_for(&self, mut lost: impl FnMut(&ChunkRef) -> bool) -> (Self, u64) {
        let mut bytes = 0;
        let chunks = self
            .chunks
            .iter()
            .map(|c| {
                if c.zero || !lost(c) {
                    return *c;
                }
                bytes += u64::from(c.len);
                ChunkRef { id: ChunkId::default(), len: c.len, zero: true }
            })
            .collect();
        (Self { chunks }, bytes)
    }

    /// Encodes the list.
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.chunks.len() <= limits::MAX_CHUNK_LIST_ENTRIES as usize);
        let mut out = Vec::with_capacity(12 + self.chunks.len() * CHUNK_REF_LEN);
        codec::preamble(&mut out, LIST_MAGIC, VERSION);
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.id.0);
            out.extend_from_slice(&c.len.to_le_bytes());
            out.extend_from_slice(&(if c.zero { FLAG_ZERO } else { 0 }).to_le_bytes());
        }
        out
    }

    /// Decodes and validates a chunk-list blob.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "chunk list");
        r.preamble(LIST_MAGIC, VERSION)?;
        let count = r.count(limits::MAX_CHUNK_LIST_ENTRIES, CHUNK_REF_LEN)?;
        let mut chunks = Vec::with_capacity(count);
        for _ in 0..count {
            let id = ChunkId(r.array()?);
            let len = r.u32()?;
            let flags = r.u32()?;
            if flags & !FLAG_ZERO != 0 {
                return Err(r.corrupt(format!("unknown chunk flags {flags:#x}")));
            }
            if len == 0 || len > limits::MAX_BLOB_SIZE {
                return Err(r.corrupt(format!("chunk of {len} bytes")));
            }
            chunks.push(ChunkRef { id, len, zero: flags & FLAG_ZERO != 0 });
        }
        r.finish()?;
        Ok(Self { chunks })
    }

    /// Sum of the chunk lengths: the segment's length.
    pub fn len_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.len)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_meta() -> impl Strategy<Value = Metadata> {
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u64>(), any::<i64>(), any::<i64>(), any::<u64>(), any::<u64>())
            .prop_map(|(mode, uid, gid, size, mtime_ns, ctime_ns, inode, dev)| Metadata {
                mode,
                uid,
                gid,
                size,
                mtime_ns,
                ctime_ns,
                inode,
                dev,
            })
    }

    fn arb_kind() -> impl Strategy<Value = NodeKind> {
        prop_oneof![
            proptest::collection::vec(proptest::array::uniform32(any::<u8>()), 0..4)
                .prop_map(|s| NodeKind::File { segments: s.into_iter().map(ChunkId).collect() }),
            proptest::array::uniform32(any::<u8>()).prop_map(|t| NodeKind::Dir { tree: ChunkId(t) }),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(|target| NodeKind::Symlink { target }),
        ]
    }

    fn arb_tree() -> impl Strategy<Value = Tree> {
        proptest::collection::btree_map("[a-zA-Z0-9._ -]{1,20}", (arb_meta(), arb_kind()), 0..20).prop_map(|m| Tree {
            nodes: m
                .into_iter()
                .filter(|(name, _)| name != "." && name != "..")
                .map(|(name, (meta, kind))| Node { name: name.into_bytes(), meta, kind })
                .collect(),
        })
    }

    #[test]
    fn tree_bytes_are_golden() {
        let tree = Tree {
            nodes: vec![Node {
                name: b"a".to_vec(),
                meta: Metadata { mode: 0o100644, size: 3, ..Default::default() },
                kind: NodeKind::Symlink { target: b"b".to_vec() },
            }],
        };
        let bytes = tree.clone().encode();
        assert_eq!(&bytes[..12], b"CBTR\x01\x00\x00\x00\x01\x00\x00\x00");
        assert_eq!(bytes.len(), 12 + NODE_FIXED_LEN + 1 + 2 + 1);
        assert_eq!(Tree::decode(&bytes).unwrap(), tree);
    }

    proptest! {
        #[test]
        fn tree_round_trips(tree in arb_tree()) {
            prop_assert_eq!(Tree::decode(&tree.clone().encode()).unwrap(), tree);
        }

        #[test]
        fn tree_truncation_is_an_error(tree in arb_tree(), cut in 1usize..50) {
            let bytes = tree.encode();
            let cut = cut.min(bytes.len());
            prop_assert!(Tree::decode(&bytes[..bytes.len() - cut]).is_err());
        }

        #[test]
        fn tree_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Tree::decode(&bytes);
            let mut with_magic = b"CBTR\x01\x00\x00\x00".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = Tree::decode(&with_magic);
        }

        #[test]
        fn tree_index_round_trips_and_garbage_never_panics(ids in proptest::collection::vec(proptest::array::uniform32(any::<u8>()), 2..40), bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let ids: Vec<ChunkId> = ids.into_iter().map(ChunkId).collect();
            let index = encode_index(&ids);
            prop_assert_eq!(TreeBlob::decode(&index).unwrap(), TreeBlob::Pieces(ids));
            prop_assert!(TreeBlob::decode(&index[..index.len() - 1]).is_err());
            prop_assert!(Tree::decode(&index).is_err(), "an index is not a piece");
            let mut with_magic = b"CBTR\x02\x00\x00\x00".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = TreeBlob::decode(&with_magic);
        }

        #[test]
        fn a_split_tree_joins_back(tree in arb_tree(), max in 200usize..2000) {
            let pieces = tree.clone().encode_pieces(max).unwrap();
            prop_assert!(pieces.iter().all(|p| p.len() <= max));
            let decoded = pieces.iter().map(|p| Tree::decode(p).unwrap()).collect();
            prop_assert_eq!(Tree::join(decoded).unwrap(), tree);
        }

        #[test]
        fn chunk_list_round_trips(chunks in proptest::collection::vec((proptest::array::uniform32(any::<u8>()), 1u32..1 << 20, any::<bool>()), 0..50)) {
            let list = ChunkList { chunks: chunks.into_iter().map(|(id, len, zero)| ChunkRef { id: ChunkId(id), len, zero }).collect() };
            prop_assert_eq!(ChunkList::decode(&list.encode()).unwrap(), list);
        }

        #[test]
        fn holes_keep_every_length_and_offset(lens in proptest::collection::vec(1u32..100_000, 0..40), lost in any::<u64>(), len in 0u64..(1 << 30)) {
            let list = ChunkList { chunks: lens.iter().enumerate().map(|(i, &len)| ChunkRef { id: ChunkId([i as u8 + 1; 32]), len, zero: i % 7 == 3 }).collect() };
            let mut i = 0;
            let (fixed, bytes) = list.with_holes_for(|_| { i += 1; lost >> (i % 64) & 1 == 1 });
            prop_assert_eq!(fixed.chunks.len(), list.chunks.len());
            let mut made = 0;
            for (a, b) in list.chunks.iter().zip(&fixed.chunks) {
                prop_assert_eq!(a.len, b.len);
                if a != b {
                    prop_assert!(b.zero && b.id == ChunkId::default() && !a.zero);
                    made += u64::from(a.len);
                }
            }
            prop_assert_eq!(made, bytes);
            prop_assert_eq!(ChunkList::decode(&fixed.encode()).unwrap(), fixed);
            let holes = ChunkList::holes(len);
            prop_assert_eq!(holes.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>(), len);
            prop_assert!(holes.chunks.iter().all(|c| c.zero));
            prop_assert_eq!(ChunkList::decode(&holes.encode()).unwrap(), holes);
        }

        #[test]
        fn chunk_list_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = ChunkList::decode(&bytes);
            let mut with_magic = b"CBCL\x01\x00\x00\x00".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = ChunkList::decode(&with_magic);
        }
    }
}
