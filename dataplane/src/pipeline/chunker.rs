//! The pure stages of the pipeline: cutting a segment into chunks. Hashing is
//! [`wire::RepoKey::blob_id`], compression is in [`crate::pipeline::pack::BlobWriter`].

use wire::repo::ChunkerParams;

use crate::pipeline::tar::PageRegion;

/// How a file is cut into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkPolicy {
    /// Content-defined (FastCDC v2020) with the repository's sizes: for streams and archives,
    /// whose bytes shift.
    Cdc(ChunkerParams),
    /// Fixed chunks of this many bytes at multiples of it: for page-structured database files,
    /// whose pages never move, so a changed page changes exactly one chunk and no rolling hash
    /// is computed.
    Fixed(u32),
}

impl ChunkPolicy {
    /// The longest chunk this policy makes.
    pub fn max_len(&self) -> usize {
        match *self {
            ChunkPolicy::Cdc(p) => p.max as usize,
            ChunkPolicy::Fixed(len) => len as usize,
        }
    }
}

/// Cut points of one segment: `(offset, len)` pairs covering it exactly. A boundary is always
/// at the segment start and end, so segments chunk independently.
pub fn cuts(segment: &[u8], policy: ChunkPolicy) -> Cuts<'_> {
    match policy {
        ChunkPolicy::Cdc(p) => Cuts::Cdc(fastcdc::v2020::FastCDC::new(segment, p.min, p.avg, p.max)),
        ChunkPolicy::Fixed(len) => Cuts::Fixed { len: len as usize, total: segment.len(), next: 0 },
    }
}

/// Content-defined cut points of one segment with the repository's sizes.
pub fn chunks(segment: &[u8], p: ChunkerParams) -> Cuts<'_> {
    cuts(segment, ChunkPolicy::Cdc(p))
}

/// Cut points of a segment that starts `base` bytes into a file with page regions (the page
/// files of a tar): inside a region, fixed chunks of `chunk` bytes at multiples of it from the
/// region's start, so they fall on the member's own page boundaries; content-defined
/// elsewhere. Covers the segment exactly, like [`cuts`].
pub fn region_cuts(
    segment: &[u8],
    base: u64,
    regions: &[PageRegion],
    chunk: u32,
    cdc: ChunkerParams,
) -> Vec<(usize, usize)> {
    let chunk = u64::from(chunk);
    let end = base + segment.len() as u64;
    let mut out = vec![];
    let content = |from: u64, to: u64, out: &mut Vec<(usize, usize)>| {
        let (s, e) = ((from - base) as usize, (to - base) as usize);
        out.extend(chunks(&segment[s..e], cdc).map(|(o, l)| (s + o, l)));
    };
    let mut pos = base;
    let first = regions.partition_point(|r| r.start + r.len <= base);
    for r in regions[first..].iter().take_while(|r| r.start < end) {
        let (from, to) = (r.start.max(base), (r.start + r.len).min(end));
        if pos < from {
            content(pos, from, &mut out);
        }
        let mut at = from;
        while at < to {
            let next = (r.start + ((at - r.start) / chunk + 1) * chunk).min(to);
            out.push(((at - base) as usize, (next - at) as usize));
            at = next;
        }
        pos = to;
    }
    if pos < end {
        content(pos, end, &mut out);
    }
    out
}

/// The iterator of [`cuts`].
pub enum Cuts<'a> {
    Cdc(fastcdc::v2020::FastCDC<'a>),
    Fixed { len: usize, total: usize, next: usize },
}

impl Iterator for Cuts<'_> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        match self {
            Cuts::Cdc(cdc) => cdc.next().map(|c| (c.offset, c.length)),
            Cuts::Fixed { len, total, next } => {
                let start = *next;
                (start < *total).then(|| {
                    *next = (start + *len).min(*total);
                    (start, *next - start)
                })
            }
        }
    }
}

/// Chunks a stream produced by `fill(offset, buf)` in windows, calling `emit` with each chunk
/// in order, and returns the stream's length. `fill` writes what it has into `buf` and
/// returns how much; less than `buf` only at the stream's end. `cut(start, window)` gives the
/// cut points of a window that starts `start` bytes into the stream; they must be those of
/// the whole stream (as [`cuts`] and [`region_cuts`] are: a cut depends only on the bytes of its
/// own chunk and where it starts), because the last chunk of a window, which may have been cut
/// short by the window's end, is carried into the next. `fill` is asked for lengths that are
/// multiples of `align` (so are its offsets, until the end); `max_chunk` is the longest
/// chunk `cut` makes; `window` is reused between calls.
pub fn chunk_stream<E>(
    align: usize,
    max_chunk: usize,
    window: &mut Vec<u8>,
    mut fill: impl FnMut(usize, &mut [u8]) -> usize,
    mut cut: impl FnMut(usize, &[u8]) -> Vec<(usize, usize)>,
    mut emit: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<usize, E> {
    let capacity = (crate::limits::STREAM_WINDOW + max_chunk).next_multiple_of(align);
    window.resize(capacity, 0);
    let (mut filled, mut produced) = (0, 0);
    loop {
        let want = (capacity - filled) / align * align;
        let n = fill(produced, &mut window[filled..filled + want]);
        filled += n;
        produced += n;
        let end = n < want;
        let mut consumed = 0;
        for (off, chunk_len) in cut(produced - filled, &window[..filled]) {
            if !end && off + chunk_len == filled {
                break;
            }
            emit(&window[off..off + chunk_len])?;
            consumed = off + chunk_len;
        }
        if end {
            return Ok(produced);
        }
        window.copy_within(consumed..filled, 0);
        filled -= consumed;
    }
}

/// True when every byte is zero: such chunks are not stored and restore leaves a hole.
#[inline]
pub fn is_zero(data: &[u8]) -> bool {
    // Word-at-a-time; the compiler vectorises the fold.
    let (head, words, tail) = unsafe { data.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().fold(0u64, |acc, &w| acc | w) == 0 && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift), so cut points are golden.
    fn seeded(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    #[test]
    fn cut_points_are_golden() {
        let data = seeded(1 << 20, 42);
        let cuts: Vec<_> = chunks(&data, ChunkerParams::default()).collect();
        assert_eq!(cuts.iter().map(|c| c.1).sum::<usize>(), data.len());
        assert!(cuts.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        let lens: Vec<usize> = cuts.iter().map(|c| c.1).collect();
        assert_eq!(lens, GOLDEN_LENS);
    }

    const GOLDEN_LENS: &[usize] = &[
        106980, 69092, 37202, 84751, 19738, 47125, 93102, 133087, 41111, 28239, 44921, 83153, 79451, 21276, 21182,
        138166,
    ];

    #[test]
    fn an_insertion_moves_only_nearby_cuts() {
        let data = seeded(2 << 20, 7);
        let mut shifted = data.clone();
        shifted.splice(1000..1000, b"inserted bytes".iter().copied());
        let a: Vec<_> = chunks(&data, ChunkerParams::default()).map(|(o, l)| &data[o..o + l]).collect();
        let b: Vec<_> = chunks(&shifted, ChunkerParams::default()).map(|(o, l)| &shifted[o..o + l]).collect();
        let shared = a.iter().filter(|c| b.contains(c)).count();
        assert!(shared + 2 >= a.len(), "only the chunks around the insertion may change: {shared} of {}", a.len());
    }

    #[test]
    fn streamed_region_cut_points_equal_whole_segment_region_cut_points() {
        let p = ChunkerParams { min: 2 << 10, avg: 8 << 10, max: 32 << 10 };
        let data = seeded(20 << 20, 3);
        // The segment starts 1 MiB into the file, inside the first region.
        let regions = [PageRegion { start: 1536, len: 3 << 20 }, PageRegion { start: (9 << 20) + 512, len: 8 << 20 }];
        let base = 1 << 20;
        let whole: Vec<&[u8]> =
            region_cuts(&data, base, &regions, 16384, p).into_iter().map(|(o, l)| &data[o..o + l]).collect();
        let mut streamed = vec![];
        let fill = |off: usize, buf: &mut [u8]| {
            let n = buf.len().min(data.len() - off).min(100_000); // short reads, as from a pipe
            buf[..n].copy_from_slice(&data[off..off + n]);
            n
        };
        // A read shorter than asked is the end: fill in whole windows, as the stream source does.
        let whole_fill = |off: usize, buf: &mut [u8]| {
            let mut n = 0;
            while n < buf.len() {
                let got = fill(off + n, &mut buf[n..]);
                if got == 0 {
                    break;
                }
                n += got;
            }
            n
        };
        let cut = |start: usize, w: &[u8]| region_cuts(w, base + start as u64, &regions, 16384, p);
        chunk_stream::<()>(1, 32 << 10, &mut Vec::new(), whole_fill, cut, |c| {
            streamed.push(c.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(streamed.len(), whole.len());
        assert!(streamed.iter().zip(&whole).all(|(a, b)| a == b));
    }

    #[test]
    fn streamed_cut_points_equal_whole_slice_cut_points() {
        let data = seeded(20 << 20, 9);
        let cdc = ChunkPolicy::Cdc(ChunkerParams { min: 2 << 10, avg: 8 << 10, max: 32 << 10 });
        for policy in [cdc, ChunkPolicy::Fixed(24 << 10), ChunkPolicy::Fixed(16 << 10)] {
            let whole: Vec<&[u8]> = cuts(&data, policy).map(|(o, l)| &data[o..o + l]).collect();
            let mut streamed = vec![];
            let mut window = Vec::new();
            let fill = |off: usize, buf: &mut [u8]| {
                let n = buf.len().min(data.len() - off);
                buf[..n].copy_from_slice(&data[off..off + n]);
                n
            };
            let cut = |_: usize, w: &[u8]| cuts(w, policy).collect();
            let len = chunk_stream::<()>(8192, policy.max_len(), &mut window, fill, cut, |c| {
                streamed.push(c.to_vec());
                Ok(())
            })
            .unwrap();
            assert_eq!(len, data.len());
            assert_eq!(streamed.len(), whole.len(), "{policy:?}");
            assert!(streamed.iter().zip(&whole).all(|(a, b)| a == b), "{policy:?}");
        }
    }

    #[test]
    fn fixed_cuts_cover_the_segment_at_multiples_of_the_length() {
        let data = vec![1u8; 100_000];
        let c: Vec<_> = cuts(&data, ChunkPolicy::Fixed(32768)).collect();
        assert_eq!(c, vec![(0, 32768), (32768, 32768), (65536, 32768), (98304, 1696)]);
        assert_eq!(cuts(&[], ChunkPolicy::Fixed(8192)).count(), 0);
    }

    #[test]
    fn region_cuts_follow_each_member_and_cover_the_segment() {
        let p = ChunkerParams { min: 256, avg: 1024, max: 4096 };
        let data = seeded(100_000, 5);
        // Two page regions at 512-byte (not page) offsets; the segment starts inside the first.
        let regions = [PageRegion { start: 1536, len: 40_960 }, PageRegion { start: 60_416, len: 16_384 }];
        let base = 10_000;
        let c = region_cuts(&data[base as usize..], base, &regions, 16_384, p);
        let mut at = 0;
        for &(off, len) in &c {
            assert_eq!(off, at, "cuts are contiguous");
            assert!(len > 0);
            at += len;
        }
        assert_eq!(at, data.len() - base as usize, "cuts cover the segment");
        let abs: Vec<(u64, u64)> = c.iter().map(|&(o, l)| (base + o as u64, l as u64)).collect();
        // The first region from the segment start, then at 1536 + 16 KiB multiples.
        assert_eq!(&abs[..3], &[(10_000, 7_920), (17_920, 16_384), (34_304, 8_192)]);
        let second: Vec<_> = abs.iter().filter(|(o, _)| (60_416..76_800).contains(o)).copied().collect();
        assert_eq!(second, vec![(60_416, 16_384)]);
        // Between the regions and after them, content-defined chunks within the CDC bounds.
        assert!(abs.iter().filter(|(o, _)| (42_496..60_416).contains(o)).all(|&(o, l)| l <= 4096 && o + l <= 60_416));
        // Without regions, the same as plain content-defined cuts.
        assert_eq!(region_cuts(&data, 0, &[], 16_384, p), chunks(&data, p).collect::<Vec<_>>());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 4099]));
        for i in [0, 7, 8, 4000, 4098] {
            let mut v = vec![0u8; 4099];
            v[i] = 1;
            assert!(!is_zero(&v[..]), "byte {i}");
            assert!(!is_zero(&v[1..]) || i == 0);
        }
    }
}
