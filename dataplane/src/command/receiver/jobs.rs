//! Sharded jobs' objects kept for clients: plans, start records and checkpoints, stored as the
//! client sealed them in the repository's `jobs/` (the receiver never opens them).
//!
//! Under a policy a job belongs to the writer whose session put its plan: an owner record
//! (`writers/job-<job>`, holding the writer's name) is written before the plan and removed
//! after it. A session reaches only jobs whose owner it may write as; a job made on the store
//! itself, or before the policy, has no owner and is out of every restricted session's reach
//! (its objects would let one tenant fence or complete another's backup).

use wire::frame::{Frame, MAX_JOB_NAMES};
use wire::job::{JobId, JobObject};

use super::policy::Access;
use super::{lock, Served};
use crate::error::{Error, Result};
use crate::repo::JobStore;
use crate::store::ObjectKind;

fn owner_name(job: JobId) -> String {
    format!("job-{}", job.to_hex())
}

/// The writer that owns `job`, if it has an owner record.
fn owner(served: &Served, job: JobId) -> Result<Option<String>> {
    let Some(bytes) = served.repo.store.get(ObjectKind::Writer, &owner_name(job))? else { return Ok(None) };
    // A record that is not a name (a stray file) names no owner anyone may write as.
    Ok(Some(String::from_utf8(bytes).unwrap_or_default()))
}

/// Whether the session may reach `job`'s objects.
fn may_reach(served: &Served, access: &Access, job: JobId) -> Result<bool> {
    if !access.restricted() {
        return Ok(true);
    }
    Ok(owner(served, job)?.is_some_and(|w| access.may_parent(Some(&w))))
}

fn denied(access: &Access, job: JobId) -> Error {
    Error::Denied(format!(
        "job {}: not a job of a writer this certificate may write as ({})",
        job.to_hex(),
        access.writes_as.iter().flatten().cloned().collect::<Vec<_>>().join(", ")
    ))
}

/// Serves one job request; returns the reply frames. `Err(Error::Denied)` when the policy
/// keeps the session from the job.
pub(super) fn serve(served: &Served, access: &Access, request: Frame) -> Result<Vec<Frame>> {
    let store = served.repo.stored_jobs();
    match request {
        Frame::PutJobObject { name: name @ JobObject::Plan(job), object, .. } if access.restricted() => {
            // Owner first: a plan is never reachable without one.
            let _g = lock(&served.publish);
            match owner(served, job)? {
                Some(w) if access.may_parent(Some(&w)) => {}
                Some(_) => return Err(denied(access, job)),
                None => {
                    let writer = access.writer().ok_or_else(|| denied(access, job))?;
                    served.repo.store.put(ObjectKind::Writer, &owner_name(job), writer.as_bytes())?;
                }
            }
            store.put(&name, &object)?;
            Ok(vec![Frame::JobObjectDone])
        }
        Frame::PutJobObject { name, object, .. } => {
            if !may_reach(served, access, name.job())? {
                return Err(denied(access, name.job()));
            }
            store.put(&name, &object)?;
            Ok(vec![Frame::JobObjectDone])
        }
        Frame::GetJobObject { name, .. } => {
            if !may_reach(served, access, name.job())? {
                return Err(denied(access, name.job()));
            }
            Ok(vec![Frame::JobObjectData { object: store.get(&name)? }])
        }
        Frame::DeleteJobObject { name, .. } => {
            let job = name.job();
            if !may_reach(served, access, job)? {
                return Err(denied(access, job));
            }
            store.delete(&name)?;
            if matches!(name, JobObject::Plan(_)) {
                // After the plan: the owner record outlives every object of its job.
                let _g = lock(&served.publish);
                served.repo.store.delete(ObjectKind::Writer, &owner_name(job))?;
            }
            Ok(vec![Frame::JobObjectDone])
        }
        Frame::ListJobObjects { job, .. } => {
            let mut reachable = std::collections::HashMap::new();
            let mut names = vec![];
            for name in store.list(job)? {
                let reach = match reachable.get(&name.job()) {
                    Some(r) => *r,
                    None => {
                        let r = may_reach(served, access, name.job())?;
                        reachable.insert(name.job(), r);
                        r
                    }
                };
                if reach {
                    names.push(name);
                }
            }
            Ok(names.chunks(MAX_JOB_NAMES as usize).map(|c| Frame::JobObjectNames { names: c.to_vec() }).collect())
        }
        other => Err(Error::Internal(format!("a {:?} frame is not a job request", other.kind()))),
    }
}
