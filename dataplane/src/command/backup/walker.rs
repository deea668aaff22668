//! The walker: the calling thread's side of a backup. It walks the source (paths, a generated
//! source, or standard input), stats entries, hands segments to the cores and completes
//! directories in post-order as their files come back.

use super::*;

/// The walker's bookkeeping for a file whose segments are on the cores.
struct FileInFlight {
    segments: Vec<Option<ChunkId>>,
    left: usize,
    /// A file on disk, checked again once read: a file that changed meanwhile may be torn.
    path: Option<PathBuf>,
}

enum PendingNode {
    Done(Node),
    File { name: Vec<u8>, meta: Metadata, slot: usize },
    Dir { name: Vec<u8>, meta: Metadata, slot: usize },
}

struct PendingDir {
    slot: usize,
    /// For messages: where the directory is in the source.
    path: PathBuf,
    nodes: Vec<PendingNode>,
}

/// How starting a file went: the slot of its segments in flight, `None` for an empty file, or
/// why the source file can't be read.
type Started = std::result::Result<Option<usize>, String>;

/// A directory of a generated source.
#[derive(Default)]
struct SynthDir {
    dirs: BTreeMap<String, SynthDir>,
    files: Vec<(String, Arc<SynthFile>)>,
}

/// The source paths as a tree of names: a `Leaf` is backed up whole, an `Inner` node is an
/// ancestor recorded only so that restore can recreate the full path.
enum Source {
    Leaf,
    Inner(BTreeMap<OsString, Source>),
}

pub(super) struct Walker<'a> {
    shared: &'a Shared,
    pub(super) tree_writer: BlobWriter<'a>,
    reader: BlobReader<'a>,
    pub(super) jobs: Sender<SegmentJob>,
    pub(super) done: Receiver<SegmentDone>,
    files: HashMap<usize, FileInFlight>,
    next_slot: usize,
    dirs_done: HashMap<usize, ChunkId>,
    pending: VecDeque<PendingDir>,
    pending_files: usize,
    pub(super) stats: SnapshotStats,
    /// Files that changed while they were read.
    pub(super) files_changed: u64,
    /// Files read that `auto` cut as pages, by engine.
    pub(super) page_files: BTreeMap<Engine, u64>,
    excludes: Excludes,
    /// PostgreSQL data directories the walk is inside of, innermost last.
    postgres_data: Vec<PathBuf>,
    /// Entries that exclusions left out.
    pub(super) excluded: u64,
    run: &'a Run,
    chunking: ChunkingRules,
    /// The repository's content-defined policy.
    cdc: ChunkPolicy,
    /// Remote repository: chunk lists of the parent's files in the directories being walked
    /// that the receiver says it has (one `Have` per directory rather than one per file).
    confirmed: HashSet<ChunkId, IdBuild>,
    /// Remote repository: the parent trees of the subdirectories of the directories being
    /// walked, fetched in one stream per directory (taken as the walk enters each).
    subtrees: HashMap<PathBuf, Tree>,
    /// Source roots whose parent files lie under another path (a new directory per backup):
    /// the parent's node at its paired root, taken as the walk reaches the root.
    rerooted: HashMap<PathBuf, Node>,
}

impl<'a> Walker<'a> {
    /// A walker that sends segments on `queue.0` and takes their results from `queue.1`.
    pub(super) fn new(
        shared: &'a Shared,
        tree_writer: BlobWriter<'a>,
        reader: BlobReader<'a>,
        queue: (Sender<SegmentJob>, Receiver<SegmentDone>),
        opts: &BackupOptions,
        run: &'a Run,
    ) -> Self {
        Self {
            shared,
            tree_writer,
            reader,
            jobs: queue.0,
            done: queue.1,
            files: HashMap::new(),
            next_slot: 0,
            dirs_done: HashMap::new(),
            pending: VecDeque::new(),
            pending_files: 0,
            stats: SnapshotStats::default(),
            files_changed: 0,
            page_files: BTreeMap::new(),
            excludes: opts.excludes.clone(),
            postgres_data: vec![],
            excluded: 0,
            run,
            chunking: opts.chunking.clone(),
            cdc: ChunkPolicy::Cdc(shared.repo.config.chunker),
            confirmed: HashSet::default(),
            subtrees: HashMap::new(),
            rerooted: HashMap::new(),
        }
    }

    /// Pairs the source roots with the parent's (`wire::repo::pair_roots`), so that a root
    /// whose path differs from its parent's still finds the parent's files below it.
    pub(super) fn reroot(&mut self, paths: &[PathBuf], names: &[String], parent: &Snapshot) -> Result<()> {
        for (i, j) in wire::repo::pair_roots(names, &parent.paths) {
            if names[i] == parent.paths[j] {
                continue;
            }
            if let Some(node) = self.parent_node(&parent.tree_id(), &parent.paths[j])? {
                self.rerooted.insert(paths[i].clone(), node);
            }
        }
        Ok(())
    }

    /// The node at absolute `path` in the snapshot whose root tree is `root`.
    fn parent_node(&mut self, root: &ChunkId, path: &str) -> Result<Option<Node>> {
        let mut tree = self.load_tree(root)?;
        let names: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for (k, name) in names.iter().enumerate() {
            let Some(node) = tree.find(name.as_bytes()).cloned() else { return Ok(None) };
            if k + 1 == names.len() {
                return Ok(Some(node));
            }
            match node.kind {
                NodeKind::Dir { tree: sub } => tree = self.load_tree(&sub)?,
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Walks a source with `walk_root` (given the parent snapshot's root tree), completes every
    /// directory, and returns the root tree's id.
    pub(super) fn walk(
        &mut self,
        parent: Option<ChunkId>,
        walk_root: impl FnOnce(&mut Self, Option<&Tree>) -> Result<usize>,
    ) -> Result<ChunkId> {
        let parent = match parent {
            Some(id) => Some(self.load_tree(&id)?),
            None => None,
        };
        let slot = walk_root(self, parent.as_ref())?;
        while !self.pending.is_empty() {
            self.complete_oldest_dir()?;
        }
        Ok(self.dirs_done.remove(&slot).expect("the root is completed last"))
    }

    /// The root directory of the source paths; returns its slot.
    pub(super) fn walk_sources(&mut self, paths: &[PathBuf], parent: Option<&Tree>) -> Result<usize> {
        let mut root = Source::Inner(BTreeMap::new());
        for p in paths {
            let names: Vec<OsString> = p.components().skip(1).map(|c| c.as_os_str().to_owned()).collect();
            insert_source(&mut root, &names);
        }
        match &root {
            Source::Leaf => self.walk_dir(Path::new("/"), parent),
            Source::Inner(children) => self.walk_ancestors(Path::new("/"), children, parent),
        }
    }

    fn walk_ancestors(
        &mut self,
        path: &Path,
        children: &BTreeMap<OsString, Source>,
        parent: Option<&Tree>,
    ) -> Result<usize> {
        let mut nodes = vec![];
        for (name, child) in children {
            let child_path = path.join(name);
            match child {
                Source::Leaf => match self.rerooted.remove(&child_path) {
                    // The parent's files of this root are under another name: look there.
                    Some(node) => {
                        let moved = Tree { nodes: vec![Node { name: name.as_bytes().to_vec(), ..node }] };
                        self.add_entry(&mut nodes, &child_path, name.as_bytes(), Some(&moved))?
                    }
                    None => self.add_entry(&mut nodes, &child_path, name.as_bytes(), parent)?,
                },
                Source::Inner(grandchildren) => {
                    let md = fs::symlink_metadata(&child_path)
                        .map_err(|e| Error::NotFound(format!("{}: {e}", child_path.display())))?;
                    let sub = self.parent_subtree(parent, name.as_bytes())?;
                    let slot = self.walk_ancestors(&child_path, grandchildren, sub.as_ref())?;
                    nodes.push(PendingNode::Dir { name: name.as_bytes().to_vec(), meta: metadata(&md), slot });
                }
            }
        }
        self.push_dir(path, nodes)
    }

    fn walk_dir(&mut self, path: &Path, parent: Option<&Tree>) -> Result<usize> {
        let mut names = vec![];
        match fs::read_dir(path) {
            Ok(entries) => {
                for entry in entries {
                    match entry {
                        Ok(e) => names.push(e.file_name()),
                        Err(e) => self.skip(path, &e.to_string()),
                    }
                }
            }
            Err(e) => self.skip(path, &format!("cannot list directory: {e}")),
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let data_dir = self.excludes.postgres_defaults
            && exclude::is_postgres_data_dir(&names.iter().map(|n| n.as_bytes()).collect::<Vec<_>>());
        if data_dir {
            self.postgres_data.push(path.to_owned());
        }
        let before = names.len();
        names.retain(|name| !self.excluded_path(&path.join(name)));
        self.excluded += (before - names.len()) as u64;
        let subdirs = self.fetch_subtrees(path, &names, parent)?;
        let lists = file_lists(parent.into_iter().chain(subdirs.iter().map(|d| &self.subtrees[d])));
        let confirmed = self.confirm(lists)?;
        let mut nodes = Vec::with_capacity(names.len());
        for name in names {
            self.add_entry(&mut nodes, &path.join(&name), name.as_bytes(), parent)?;
        }
        for id in confirmed {
            self.confirmed.remove(&id);
        }
        for dir in subdirs {
            self.subtrees.remove(&dir);
        }
        if data_dir {
            self.postgres_data.pop();
        }
        self.push_dir(path, nodes)
    }

    /// Whether the user's patterns, or PostgreSQL's own rules inside a data directory, leave
    /// out the entry at `path`.
    fn excluded_path(&self, path: &Path) -> bool {
        let postgres = self.postgres_data.last().and_then(|root| path.strip_prefix(root).ok());
        self.excludes.matches(path) || postgres.is_some_and(exclude::postgres_skips)
    }

    /// Where reads cost a round trip: fetches the parent trees of this directory's
    /// subdirectories (those still here, at most [`limits::PREFETCH_SUBTREES`]) in one stream
    /// instead of one round trip each; returns the paths they are kept under.
    fn fetch_subtrees(&mut self, path: &Path, names: &[OsString], parent: Option<&Tree>) -> Result<Vec<PathBuf>> {
        let Some(parent) = parent.filter(|_| self.shared.repo.backend.reads_round_trip()) else { return Ok(vec![]) };
        let wanted: Vec<(PathBuf, ChunkId)> = names
            .iter()
            .filter_map(|name| match parent.find(name.as_bytes()) {
                Some(Node { kind: NodeKind::Dir { tree }, .. }) => Some((path.join(name), *tree)),
                _ => None,
            })
            .take(limits::PREFETCH_SUBTREES)
            .collect();
        self.reader.prefetch(wanted.iter().map(|(_, id)| *id).collect());
        let mut fetched = Vec::with_capacity(wanted.len());
        for (dir, id) in wanted {
            let tree = self.load_tree(&id)?;
            self.subtrees.insert(dir.clone(), tree);
            fetched.push(dir);
        }
        Ok(fetched)
    }

    /// Asks once which of these chunk lists (of the parent's files) the repository has, and
    /// remembers them until the directory being walked is done; returns them.
    fn confirm(&mut self, mut ids: Vec<ChunkId>) -> Result<Vec<ChunkId>> {
        ids.retain(|id| !self.confirmed.contains(id));
        let present = self.shared.repo.backend.have(self.shared.known.index(), &ids)?;
        let confirmed: Vec<ChunkId> =
            ids.into_iter().zip(present).filter(|(_, have)| *have).map(|(id, _)| id).collect();
        self.confirmed.extend(confirmed.iter().copied());
        Ok(confirmed)
    }

    /// Whether every chunk list of `ids` is stored (the parent's lists of an unchanged file).
    fn lists_stored(&self, ids: &[ChunkId]) -> Result<bool> {
        if ids.iter().all(|id| self.confirmed.contains(id)) {
            return Ok(true);
        }
        Ok(self.shared.repo.backend.have(self.shared.known.index(), ids)?.into_iter().all(|have| have))
    }

    fn add_entry(
        &mut self,
        nodes: &mut Vec<PendingNode>,
        path: &Path,
        name: &[u8],
        parent: Option<&Tree>,
    ) -> Result<()> {
        if self.run.cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let md = match fs::symlink_metadata(path) {
            Ok(md) => md,
            Err(e) => {
                self.skip(path, &e.to_string());
                return Ok(());
            }
        };
        let meta = metadata(&md);
        let name = name.to_vec();
        let ft = md.file_type();
        if ft.is_dir() {
            let sub = match self.subtrees.remove(path) {
                Some(fetched) => Some(fetched),
                None => self.parent_subtree(parent, &name)?,
            };
            let slot = self.walk_dir(path, sub.as_ref())?;
            nodes.push(PendingNode::Dir { name, meta, slot });
        } else if ft.is_file() {
            if let Err(why) = self
                .add_file(nodes, name, meta, parent, |walker, meta, previous| walker.start_file(path, meta, previous))?
            {
                self.skip(path, &why);
            }
        } else if ft.is_symlink() {
            match fs::read_link(path) {
                Ok(target) => {
                    let target = target.as_os_str().as_bytes().to_vec();
                    nodes.push(PendingNode::Done(Node { name, meta, kind: NodeKind::Symlink { target } }));
                }
                Err(e) => self.skip(path, &e.to_string()),
            }
        } else {
            // Counted, so the backup says it is not whole (exit 3) instead of dropping them quietly.
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_socket() {
                "a socket"
            } else if ft.is_block_device() || ft.is_char_device() {
                "a device node"
            } else {
                "not a regular file, directory or symlink"
            };
            self.skip(path, &format!("{kind}: not recorded by this version, left out"));
        }
        Ok(())
    }

    /// Adds a regular file: reused from the parent when unchanged, else started by `start`.
    /// The inner error is why the source file can't be read (it is left out with a warning);
    /// the outer one stops the backup (a core failed).
    fn add_file(
        &mut self,
        nodes: &mut Vec<PendingNode>,
        name: Vec<u8>,
        mut meta: Metadata,
        parent: Option<&Tree>,
        start: impl FnOnce(&mut Self, &mut Metadata, &[ChunkId]) -> Result<Started>,
    ) -> Result<std::result::Result<(), String>> {
        let old = parent.and_then(|t| t.find(&name));
        let previous = match old {
            Some(Node { kind: NodeKind::File { segments }, .. }) => &segments[..],
            _ => &[],
        };
        let reusable = match old {
            // Reused only while its chunk lists are still indexed: a damaged repository heals
            // by reading the file again.
            Some(Node { meta: old, kind: NodeKind::File { segments }, .. })
                if unchanged(old, &meta) && self.lists_stored(segments)? =>
            {
                Some(segments.clone())
            }
            _ => None,
        };
        let node = match reusable {
            Some(segments) => {
                self.shared.progress.add(meta.size, 1);
                PendingNode::Done(Node { name, meta, kind: NodeKind::File { segments } })
            }
            None => match start(self, &mut meta, previous)? {
                Ok(Some(slot)) => PendingNode::File { name, meta, slot },
                Ok(None) => PendingNode::Done(Node { name, meta, kind: NodeKind::File { segments: vec![] } }),
                Err(why) => return Ok(Err(why)),
            },
        };
        self.stats.files += 1;
        self.stats.bytes_total += meta.size;
        nodes.push(node);
        Ok(Ok(()))
    }

    /// Maps a file and queues its segments.
    fn start_file(&mut self, path: &Path, meta: &mut Metadata, previous: &[ChunkId]) -> Result<Started> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => return Ok(Err(format!("cannot open: {e}"))),
        };
        // SAFETY: the mapping is read-only and private. A file truncated by another process
        // while mapped raises SIGBUS on a read past its new end: the cores read it under
        // `truncated::reading`, which turns that into zeros and lets the backup go on.
        let map = match file.metadata().map(|m| m.len()) {
            Ok(0) => {
                meta.size = 0;
                return Ok(Ok(None));
            }
            Ok(_) => unsafe { Mmap::map(&file) },
            Err(e) => Err(e),
        };
        let map = match map {
            Ok(m) => m,
            Err(e) => return Ok(Err(format!("cannot read: {e}"))),
        };
        let _ = map.advise(Advice::Sequential);
        meta.size = map.len() as u64;
        let chunking = self.chunking.for_path(path);
        let segment = self.shared.repo.config.segment_size;
        let head = truncated::reading(&map, || map[..engine::HEAD.min(map.len())].to_vec());
        let (mut plan, why) = chunking.plan(path, meta.size, &head, self.cdc, segment);
        if let Some(why) = why {
            self.run.warn(path, &why);
        }
        let mut regions = None;
        if plan.policy == self.cdc {
            // The tar scan reads the mapping too (headers throughout the file).
            let scanned = truncated::reading(&map, || {
                chunking.tar_scanner(&map).map(|(mut scanner, plan)| {
                    scanner.feed(&map);
                    (scanner.finish(), plan)
                })
            });
            if let Some((layout, tar_plan)) = scanned {
                for warning in &layout.warnings {
                    self.run.warn(path, &format!("tar: {warning}"));
                }
                if !layout.pages.is_empty() {
                    (plan, regions) = (tar_plan, Some(layout.pages.into()));
                }
            }
        }
        let source = SegmentSource::Mapped(Arc::new(map));
        let slot = self.queue_segments(source, meta.size, plan, regions, previous)?;
        self.files.get_mut(&slot).expect("just queued").path = Some(path.to_owned());
        Ok(Ok(Some(slot)))
    }

    /// Queues every segment of a file of `len` bytes, cut as `plan` says, and returns its
    /// slot. `previous` are the file's chunk lists in the parent snapshot.
    fn queue_segments(
        &mut self,
        source: SegmentSource,
        len: u64,
        plan: FilePlan,
        regions: Option<Arc<[PageRegion]>>,
        previous: &[ChunkId],
    ) -> Result<usize> {
        let segment_size = self.shared.repo.config.segment_size;
        let count = len.div_ceil(segment_size) as usize;
        if let Some(engine) = plan.engine {
            *self.page_files.entry(engine).or_default() += 1;
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        self.files.insert(slot, FileInFlight { segments: vec![None; count], left: count, path: None });
        self.pending_files += 1;
        for segment in 0..count {
            let offset = segment as u64 * segment_size;
            let len = segment_size.min(len - offset) as usize;
            let job = SegmentJob {
                source: source.clone(),
                policy: plan.policy,
                page: plan.page,
                previous: previous.get(segment).copied(),
                regions: regions.clone(),
                file: slot,
                segment,
                offset: offset as usize,
                len,
            };
            self.queue(job)?;
        }
        Ok(slot)
    }

    /// Standard input as the one file `name` of the snapshot's root: read piece by piece, each
    /// segment chunked on a core while the next is read, so memory stays at
    /// [`limits::STDIN_PIECES`] pieces per segment in flight whatever the stream's length.
    pub(super) fn walk_stdin(&mut self, name: &str, parent: Option<&Tree>) -> Result<usize> {
        let mut nodes = vec![];
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        let meta = Metadata { mode: 0o100600, mtime_ns: now, ctime_ns: now, ..Default::default() };
        let name = stdin_name(name)?.to_owned();
        let mut input = std::io::stdin().lock();
        // A read error of standard input stops the backup (the outer result): the inner one,
        // a file left out, is never given.
        let added = self.add_file(&mut nodes, name.as_bytes().to_vec(), meta, parent, |walker, meta, previous| {
            walker.start_stream(&mut input, Path::new(&format!("/{name}")), meta, previous).map(Ok)
        })?;
        debug_assert!(added.is_ok());
        self.push_dir(Path::new("/"), nodes)
    }

    /// Reads `input` to its end as the file `path`, queueing each segment as it begins and
    /// sending it its bytes as they come; returns the file's slot (`None` when it is empty).
    fn start_stream(
        &mut self,
        input: &mut impl std::io::Read,
        path: &Path,
        meta: &mut Metadata,
        previous: &[ChunkId],
    ) -> Result<Option<usize>> {
        let segment = self.shared.repo.config.segment_size;
        let piece_len = limits::STDIN_PIECE.min(segment as usize);
        let mut piece = read_piece(input, piece_len)?;
        meta.size = 0;
        if piece.is_empty() {
            return Ok(None);
        }
        // A stream is judged by its name and first bytes: its length is not known yet.
        let chunking = self.chunking.for_path(path);
        let head = &piece[..engine::HEAD.min(piece.len())];
        let (mut plan, why) = chunking.plan(path, 0, head, self.cdc, segment);
        if let Some(why) = why {
            self.run.warn(path, &why);
        }
        let mut scanner = None;
        if plan.policy == self.cdc {
            if let Some((tar_scanner, tar_plan)) = chunking.tar_scanner(&piece) {
                (scanner, plan) = (Some(tar_scanner), tar_plan);
            }
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        self.files.insert(slot, FileInFlight { segments: vec![], left: 0, path: None });
        self.pending_files += 1;
        // Regions found so far that reach into the segment being read.
        let mut open: Vec<PageRegion> = vec![];
        let mut found = 0;
        let mut offset = 0u64;
        while !piece.is_empty() {
            let index = self.files[&slot].segments.len();
            if index >= wire::limits::MAX_FILE_SEGMENTS as usize {
                return Err(Error::Usage(format!(
                    "standard input: longer than {} segments of {segment} bytes",
                    wire::limits::MAX_FILE_SEGMENTS
                )));
            }
            let (pieces, stream) = bounded(limits::STDIN_PIECES);
            let f = self.files.get_mut(&slot).expect("inserted above");
            f.segments.push(None);
            f.left += 1;
            let job = SegmentJob {
                source: SegmentSource::Stream(stream),
                policy: plan.policy,
                page: plan.page,
                previous: previous.get(index).copied(),
                regions: scanner.as_ref().map(|_| Arc::from(Vec::new())),
                file: slot,
                segment: index,
                offset: offset as usize,
                len: segment as usize,
            };
            self.queue(job)?;
            open.retain(|r| r.start + r.len > offset);
            let end = offset + segment;
            let mut first = true;
            loop {
                let mut regions = if first { open.clone() } else { vec![] };
                first = false;
                if let Some(scanner) = scanner.as_mut() {
                    scanner.feed(&piece);
                    let new = &scanner.layout.pages[found..];
                    found = scanner.layout.pages.len();
                    regions.extend_from_slice(new);
                    open.extend_from_slice(new);
                    for warning in scanner.layout.warnings.drain(..) {
                        self.run.warn(path, &format!("tar: {warning}"));
                    }
                }
                offset += piece.len() as u64;
                let sent = StreamPiece { bytes: piece, regions };
                self.send_to_cores(&pieces, sent, "a core stopped reading standard input")?;
                piece = read_piece(input, piece_len.min((end - offset) as usize))?;
                if offset == end {
                    piece = read_piece(input, piece_len)?;
                    break;
                }
                if piece.is_empty() {
                    break;
                }
            }
        }
        // A tar counts as a page file when page files were found in it, as a mapped one does.
        let has_pages = scanner.as_ref().is_none_or(|_| found > 0);
        if let (Some(engine), true) = (plan.engine, has_pages) {
            *self.page_files.entry(engine).or_default() += 1;
        }
        if let Some(scanner) = scanner {
            for warning in scanner.finish().warnings {
                self.run.warn(path, &format!("tar: {warning}"));
            }
        }
        meta.size = offset;
        Ok(Some(slot))
    }

    /// Walks a generated source: its files in their directories.
    /// The root directory of a generated source; returns its slot.
    pub(super) fn walk_synth(&mut self, spec: &SynthSpec, parent: Option<&Tree>) -> Result<usize> {
        let mut root = SynthDir::default();
        for f in spec.files() {
            let mut dir = &mut root;
            let mut names: Vec<&str> = f.path.split('/').collect();
            let file_name = names.pop().expect("paths have a file name").to_owned();
            for d in names {
                dir = dir.dirs.entry(d.to_owned()).or_default();
            }
            dir.files.push((file_name, Arc::new(f)));
        }
        let spec = Arc::new(spec.clone());
        self.walk_synth_dir(&spec, &root, parent)
    }

    fn walk_synth_dir(&mut self, spec: &Arc<SynthSpec>, dir: &SynthDir, parent: Option<&Tree>) -> Result<usize> {
        let mut nodes = vec![];
        for (name, sub) in &dir.dirs {
            let subtree = self.parent_subtree(parent, name.as_bytes())?;
            let slot = self.walk_synth_dir(spec, sub, subtree.as_ref())?;
            let meta = spec.dir_metadata();
            nodes.push(PendingNode::Dir { name: name.as_bytes().to_vec(), meta, slot });
        }
        for (name, f) in &dir.files {
            if self.run.cancel.is_cancelled() {
                return Err(Error::Interrupted);
            }
            let meta = f.metadata();
            let source = SegmentSource::Synth(Arc::clone(spec), Arc::clone(f));
            let chunking = self.chunking.for_path(Path::new(&f.path));
            let mut head = vec![0; if f.len() >= synth::PAGE as u64 { synth::PAGE } else { 0 }];
            spec.fill(f, 0, &mut head);
            let segment = self.shared.repo.config.segment_size;
            // Generated files are whole pages: no warning to give.
            let (plan, _) = chunking.plan(Path::new(&f.path), f.len(), &head, self.cdc, segment);
            // A generated file is always readable: the inner result is always Ok.
            let added =
                self.add_file(&mut nodes, name.as_bytes().to_vec(), meta, parent, |walker, meta, previous| {
                    Ok(Ok(Some(walker.queue_segments(source, meta.size, plan, None, previous)?)))
                })?;
            debug_assert!(added.is_ok());
        }
        self.push_dir(Path::new(&spec.source_name()), nodes)
    }

    /// Queues a segment.
    fn queue(&mut self, job: SegmentJob) -> Result<()> {
        self.send_to_cores(&self.jobs.clone(), job, "the cores stopped taking segments")
    }

    /// Sends `item` to the cores on `channel`, taking answers while it is full so the cores never
    /// wait on us; `stopped` says what failed if the cores are gone.
    fn send_to_cores<T>(&mut self, channel: &Sender<T>, item: T, stopped: &str) -> Result<()> {
        let mut item = Some(item);
        while item.is_some() {
            // The message expression is evaluated only if the send arm is the one selected.
            select! {
                send(channel, item.take().expect("loop condition")) -> sent => {
                    sent.map_err(|_| Error::Internal(stopped.into()))?
                }
                recv(self.done) -> answer => self.take_answer(answer)?,
            }
        }
        Ok(())
    }

    fn take_answer(&mut self, answer: std::result::Result<SegmentDone, crossbeam_channel::RecvError>) -> Result<()> {
        let done = answer.map_err(|_| Error::Internal("the cores stopped answering".into()))?;
        let summary = done.result?;
        let f = self.files.get_mut(&done.file).expect("answers are for files in flight");
        debug_assert!(f.segments[done.segment].is_none());
        f.segments[done.segment] = Some(summary.list);
        f.left -= 1;
        self.stats.bytes_read += summary.bytes;
        self.stats.chunks_total += summary.chunks;
        self.shared.progress.add(0, u64::from(f.left == 0));
        Ok(())
    }

    fn push_dir(&mut self, path: &Path, nodes: Vec<PendingNode>) -> Result<usize> {
        let slot = self.next_slot;
        self.next_slot += 1;
        self.pending.push_back(PendingDir { slot, path: path.to_owned(), nodes });
        while self.pending_files > limits::PENDING_FILES || self.pending.len() > limits::PENDING_DIRS {
            self.complete_oldest_dir()?;
        }
        Ok(slot)
    }

    /// Waits for the files of the oldest pending directory and stores its tree. Directories
    /// are pushed in post-order, so its subdirectories are already complete.
    fn complete_oldest_dir(&mut self) -> Result<()> {
        let dir = self.pending.pop_front().expect("called with a pending directory");
        let mut entries = Vec::with_capacity(dir.nodes.len());
        for node in dir.nodes {
            entries.push(match node {
                PendingNode::Done(n) => DirEntry::Node(n),
                PendingNode::File { name, meta, slot } => {
                    while self.files[&slot].left > 0 {
                        let answer = self.done.recv();
                        self.take_answer(answer)?;
                    }
                    let f = self.files.remove(&slot).expect("checked above");
                    self.pending_files -= 1;
                    if let Some(path) = &f.path {
                        self.check_unchanged(path, &meta);
                    }
                    DirEntry::File { name, meta, segments: f.segments }
                }
                PendingNode::Dir { name, meta, slot } => {
                    let tree = self.dirs_done.remove(&slot).expect("subdirectories complete before their parent");
                    DirEntry::Node(Node { name, meta, kind: NodeKind::Dir { tree } })
                }
            });
        }
        let blobs = assemble::dir_tree(&dir.path.to_string_lossy(), entries)?;
        let id = blobs.store(|bytes| self.tree_writer.store(BlobKind::Tree, bytes).map(|(id, _)| id))?;
        self.dirs_done.insert(dir.slot, id);
        self.stats.dirs += 1;
        Ok(())
    }

    fn parent_subtree(&mut self, parent: Option<&Tree>, name: &[u8]) -> Result<Option<Tree>> {
        match parent.and_then(|t| t.find(name)) {
            Some(Node { kind: NodeKind::Dir { tree }, .. }) => Ok(Some(self.load_tree(&tree.clone())?)),
            _ => Ok(None),
        }
    }

    fn load_tree(&mut self, id: &ChunkId) -> Result<Tree> {
        self.reader.read_tree(id)
    }

    /// Warns when a file read for this backup was changed while it was read: its copy may mix
    /// old and new pages (a torn page), so the backup ends as partial.
    fn check_unchanged(&mut self, path: &Path, read: &Metadata) {
        let now = fs::symlink_metadata(path).map(|md| metadata(&md));
        if now.as_ref().is_ok_and(|now| unchanged(read, now)) {
            return;
        }
        self.files_changed += 1;
        match now {
            Ok(now) if now.size < read.size => self.run.warn(
                path,
                &format!(
                    "shrank from {} to {} bytes while it was read (truncated, as logrotate's copytruncate does): \
                     stored at its old size, the bytes past the new end as read or as zeros",
                    read.size, now.size
                ),
            ),
            _ => self.run.warn(
                path,
                "changed while it was read: stored as read, possibly inconsistent (back up a stopped \
                 database, a filesystem snapshot, or use the database's backup mode)",
            ),
        }
    }

    fn skip(&mut self, path: &Path, why: &str) {
        self.stats.files_skipped += 1;
        self.run.warn(path, why);
    }
}

fn insert_source(node: &mut Source, names: &[OsString]) {
    let Source::Inner(children) = node else {
        return;
    };
    match names {
        [] => *node = Source::Leaf,
        [first, rest @ ..] => {
            insert_source(children.entry(first.clone()).or_insert_with(|| Source::Inner(BTreeMap::new())), rest)
        }
    }
}

/// Up to `len` bytes of `input`, fewer only at its end.
fn read_piece(input: &mut impl std::io::Read, len: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut piece = Vec::with_capacity(len);
    let io = |source| Error::Io { path: PathBuf::from("standard input"), source };
    input.by_ref().take(len as u64).read_to_end(&mut piece).map_err(io)?;
    Ok(piece)
}

/// A file is unchanged when size, mtime, ctime and inode all match: it is not read again.
/// The chunk lists of the files of these trees.
fn file_lists<'t>(trees: impl Iterator<Item = &'t Tree>) -> Vec<ChunkId> {
    trees
        .flat_map(|t| &t.nodes)
        .filter_map(|n| match &n.kind {
            NodeKind::File { segments } => Some(segments),
            _ => None,
        })
        .flatten()
        .copied()
        .collect()
}

fn unchanged(old: &Metadata, new: &Metadata) -> bool {
    old.size == new.size && old.mtime_ns == new.mtime_ns && old.ctime_ns == new.ctime_ns && old.inode == new.inode
}
