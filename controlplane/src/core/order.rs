//! The order in which waiting backups are placed. Classes are strictly ordered (critical before
//! high before normal before low), and within a class the earliest RPO deadline comes first.
//! Aging keeps a low class from starving: a backup still waiting [`AGING_STEP`] after it became
//! due is ranked one class higher, and one more per further step, up to critical. So once due, a
//! backup of any class is ranked with critical ones after at most 3 × `AGING_STEP`, where its
//! deadline (already past) puts it ahead of every critical backup due after it: no backup waits
//! longer than that plus the time to run the critical backups due before it.
//!
//! The order is incremental: a backup is placed in a sorted set once, and moved only when it
//! ages, at times kept in a second sorted set, so a pass costs what changed.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use super::model::{DbName, Millis, Priority};

/// How long past its due time a waiting backup takes to rise one class.
pub const AGING_STEP: Millis = Millis::from_secs(30 * 60);

/// A waiting backup's place: its rank (0 is critical; aging lowers it), then its deadline.
pub type Place = (u8, Millis, DbName);

#[derive(Clone, Debug)]
struct Waiting {
    class: Priority,
    /// When its snapshot would be older than its RPO.
    deadline: Millis,
    /// When it became due (it waits from then).
    due: Millis,
    /// Steps aged so far.
    aged: u8,
}

impl Waiting {
    fn rank(&self) -> u8 {
        self.class.rank().saturating_sub(self.aged)
    }

    /// When it next rises a class, if it still can.
    fn next_aging(&self) -> Option<Millis> {
        (self.rank() > 0).then(|| self.due.after(Millis(AGING_STEP.0 * (u64::from(self.aged) + 1))))
    }
}

#[derive(Default)]
pub struct WaitOrder {
    waiting: FxHashMap<DbName, Waiting>,
    order: BTreeSet<Place>,
    aging: BTreeSet<(Millis, DbName)>,
    by_class: [usize; 4],
}

impl WaitOrder {
    /// Adds (or replaces) `db`'s waiting backup, due at `due`, whose deadline is `deadline`.
    pub fn push(&mut self, db: DbName, class: Priority, due: Millis, deadline: Millis) {
        self.remove(&db);
        let w = Waiting { class, deadline, due, aged: 0 };
        self.order.insert((w.rank(), w.deadline, db.clone()));
        if let Some(at) = w.next_aging() {
            self.aging.insert((at, db.clone()));
        }
        self.by_class[usize::from(class.rank())] += 1;
        self.waiting.insert(db, w);
    }

    /// Takes `db` out (placed, or removed from the fleet); false when it was not waiting.
    pub fn remove(&mut self, db: &DbName) -> bool {
        self.take(db).is_some()
    }

    /// Takes `db` out and returns what [`Self::push`] needs to put it back: its class, when it
    /// became due and its deadline (put back later, it catches up the aging it missed).
    pub fn take(&mut self, db: &DbName) -> Option<(Priority, Millis, Millis)> {
        let w = self.waiting.remove(db)?;
        self.by_class[usize::from(w.class.rank())] -= 1;
        self.order.remove(&(w.rank(), w.deadline, db.clone()));
        if let Some(at) = w.next_aging() {
            self.aging.remove(&(at, db.clone()));
        }
        Some((w.class, w.due, w.deadline))
    }

    /// Raises every backup whose aging time has come by `now`; returns how many rose.
    pub fn age(&mut self, now: Millis) -> usize {
        let mut rose = 0;
        while let Some((at, _)) = self.aging.first() {
            if *at > now {
                break;
            }
            let (_, db) = self.aging.pop_first().expect("first exists");
            let w = self.waiting.get_mut(&db).expect("aging entries are waiting");
            self.order.remove(&(w.rank(), w.deadline, db.clone()));
            w.aged += 1;
            self.order.insert((w.rank(), w.deadline, db.clone()));
            if let Some(next) = w.next_aging() {
                self.aging.insert((next, db));
            }
            rose += 1;
        }
        rose
    }

    /// The first waiting backup placed after `after` (a place [`Self::first_after`] gave), or
    /// the first of all: a pass walks the order this way while it takes backups out of it.
    pub fn first_after(&self, after: Option<&Place>) -> Option<Place> {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(Unbounded, Excluded);
        self.order.range((from, Unbounded)).next().cloned()
    }

    /// Waiting backups in the order they are placed: rank, deadline, name.
    pub fn iter(&self) -> impl Iterator<Item = (&DbName, u8, Millis)> + '_ {
        self.order.iter().map(|(rank, deadline, db)| (db, *rank, *deadline))
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Waiting backups by their class (not their aged rank), critical first.
    pub fn count_by_class(&self) -> [usize; 4] {
        self.by_class
    }

    /// The first waiting backup and its class.
    pub fn first(&self) -> Option<(&DbName, Priority)> {
        self.order.first().map(|(_, _, db)| (db, self.waiting[db].class))
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> DbName {
        DbName(s.into())
    }

    fn names(o: &WaitOrder) -> Vec<&str> {
        o.iter().map(|(db, ..)| &*db.0).collect()
    }

    #[test]
    fn classes_first_then_earliest_deadline() {
        let mut o = WaitOrder::default();
        o.push(name("low-early"), Priority::Low, Millis(0), Millis(10));
        o.push(name("crit-late"), Priority::Critical, Millis(0), Millis(900));
        o.push(name("crit-early"), Priority::Critical, Millis(0), Millis(100));
        o.push(name("normal"), Priority::Normal, Millis(0), Millis(50));
        assert_eq!(names(&o), ["crit-early", "crit-late", "normal", "low-early"]);
        // A new push replaces the old one.
        o.push(name("normal"), Priority::High, Millis(0), Millis(50));
        assert_eq!(names(&o), ["crit-early", "crit-late", "normal", "low-early"]);
        assert_eq!(o.iter().nth(2).unwrap().1, Priority::High.rank());
        let first = o.first_after(None).unwrap();
        assert_eq!(first.2, name("crit-early"));
        assert_eq!(o.first_after(Some(&first)).unwrap().2, name("crit-late"));
        assert!(o.remove(&name("crit-early")));
        assert_eq!(
            o.first_after(Some(&first)).unwrap().2,
            name("crit-late"),
            "a removed place still works as a cursor"
        );
        assert!(!o.remove(&name("crit-early")));
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn a_low_backup_rises_one_class_per_step_and_then_passes_critical_ones_due_after_it() {
        let mut o = WaitOrder::default();
        let due = Millis::from_secs(1000);
        o.push(name("low"), Priority::Low, due, due);
        assert_eq!(o.age(due.after(Millis(AGING_STEP.0 - 1))), 0);
        assert_eq!(o.age(due.after(AGING_STEP)), 1);
        assert_eq!(o.iter().next().unwrap().1, Priority::Normal.rank());
        // Two more steps at once: both happen.
        assert_eq!(o.age(due.after(Millis(AGING_STEP.0 * 3))), 2);
        assert_eq!(o.iter().next().unwrap().1, 0);
        // Ranked critical; nothing left to age.
        assert_eq!(o.age(Millis(u64::MAX)), 0);
        let later = due.after(Millis(1));
        o.push(name("crit-due-later"), Priority::Critical, later, later);
        let earlier = Millis(due.0 - 1);
        o.push(name("crit-due-earlier"), Priority::Critical, earlier, earlier);
        assert_eq!(names(&o), ["crit-due-earlier", "low", "crit-due-later"]);
    }

    #[test]
    fn a_backup_taken_out_and_put_back_later_catches_up_its_aging() {
        let mut o = WaitOrder::default();
        o.push(name("low"), Priority::Low, Millis(0), Millis(5));
        let (class, due, deadline) = o.take(&name("low")).unwrap();
        assert!(o.is_empty());
        o.push(name("low"), class, due, deadline);
        assert_eq!(o.age(Millis(AGING_STEP.0 * 2)), 2);
        assert_eq!(o.iter().next().unwrap().1, Priority::Low.rank() - 2);
    }

    #[test]
    fn removing_a_backup_also_cancels_its_aging() {
        let mut o = WaitOrder::default();
        o.push(name("a"), Priority::Low, Millis(0), Millis(0));
        o.remove(&name("a"));
        assert_eq!(o.age(Millis(u64::MAX)), 0);
        assert!(o.is_empty() && o.aging.is_empty());
    }
}
