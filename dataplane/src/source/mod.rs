//! Where backed-up bytes come from besides the filesystem walk: generated `synth://` sources,
//! and who this host is.

pub mod engine;
pub mod exclude;
pub mod synth;
pub mod throttle;
pub(crate) mod truncated;

/// This host's name, recorded in snapshots and told to receivers.
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer outlives the call and its length is passed.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown".into()
    }
}
