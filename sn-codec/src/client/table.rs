//! The fixed-capacity topic name <-> topic id table.

/// One registration: a topic id and where its name sits in the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    id: u16,
    start: u16,
    len: u16,
}

impl Entry {
    const EMPTY: Entry = Entry {
        id: 0,
        start: 0,
        len: 0,
    };
}

/// The table is full: no free entry, or not enough room left in the name arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

/// Up to `N` topic names with their ids, the names packed back to back in a `B`-byte arena.
///
/// Entries are kept in arena order, so that removing one is a single `copy_within` of the
/// names that follow it.
#[derive(Debug, Clone)]
pub(crate) struct TopicTable<const N: usize, const B: usize> {
    entries: [Entry; N],
    count: u16,
    names: [u8; B],
    used: u16,
}

impl<const N: usize, const B: usize> TopicTable<N, B> {
    /// An empty table. `N` and `B` must not exceed `u16::MAX` (checked by the client).
    pub(crate) const fn new() -> Self {
        TopicTable {
            entries: [Entry::EMPTY; N],
            count: 0,
            names: [0; B],
            used: 0,
        }
    }

    fn live(&self) -> &[Entry] {
        self.entries.get(..self.count as usize).unwrap_or(&[])
    }

    fn name_at(&self, e: &Entry) -> Option<&str> {
        let start = e.start as usize;
        let bytes = self.names.get(start..start + e.len as usize)?;
        core::str::from_utf8(bytes).ok()
    }

    fn index_of_name(&self, name: &str) -> Option<usize> {
        self.live().iter().position(|e| self.name_at(e) == Some(name))
    }

    fn index_of_id(&self, id: u16) -> Option<usize> {
        self.live().iter().position(|e| e.id == id)
    }

    /// Number of registrations held.
    pub(crate) fn len(&self) -> usize {
        self.count as usize
    }

    /// Bytes of the name arena in use.
    pub(crate) fn arena_used(&self) -> usize {
        self.used as usize
    }

    /// The name registered under `id`.
    pub(crate) fn name_of(&self, id: u16) -> Option<&str> {
        let i = self.index_of_id(id)?;
        self.name_at(self.entries.get(i)?)
    }

    /// The id registered for `name`.
    pub(crate) fn id_of(&self, name: &str) -> Option<u16> {
        let i = self.index_of_name(name)?;
        self.entries.get(i).map(|e| e.id)
    }

    /// Whether [`TopicTable::insert`] of `name` (under a new id) would succeed.
    pub(crate) fn can_insert(&self, name: &str) -> bool {
        self.index_of_name(name).is_some() || (self.len() < N && self.arena_used() + name.len() <= B)
    }

    /// Records `name` under `id`, replacing whatever either was mapped to before.
    ///
    /// Returns `Ok(true)` when the table changed, `Ok(false)` when this exact mapping was
    /// already there.
    pub(crate) fn insert(&mut self, id: u16, name: &str) -> Result<bool, Full> {
        if let Some(i) = self.index_of_name(name) {
            if self.entries.get(i).map(|e| e.id) == Some(id) {
                return Ok(false);
            }
            // The id may belong to another name: that mapping is stale now.
            if let Some(j) = self.index_of_id(id) {
                self.remove_at(j);
            }
            let i = self.index_of_name(name).ok_or(Full)?;
            if let Some(e) = self.entries.get_mut(i) {
                e.id = id;
            }
            return Ok(true);
        }
        if let Some(j) = self.index_of_id(id) {
            self.remove_at(j);
        }
        let start = self.arena_used();
        let end = start.checked_add(name.len()).ok_or(Full)?;
        if self.len() >= N || end > B {
            return Err(Full);
        }
        let dst = self.names.get_mut(start..end).ok_or(Full)?;
        dst.copy_from_slice(name.as_bytes());
        let slot = self.entries.get_mut(self.count as usize).ok_or(Full)?;
        // `end <= B <= u16::MAX`, so these conversions are exact.
        *slot = Entry {
            id,
            start: start as u16,
            len: name.len() as u16,
        };
        self.count += 1;
        self.used = end as u16;
        Ok(true)
    }

    /// Forgets the registration of `id`. Returns whether there was one.
    pub(crate) fn remove_id(&mut self, id: u16) -> bool {
        match self.index_of_id(id) {
            Some(i) => {
                self.remove_at(i);
                true
            }
            None => false,
        }
    }

    fn remove_at(&mut self, i: usize) {
        let count = self.len();
        let Some(e) = self.entries.get(i).copied() else {
            return;
        };
        let start = e.start as usize;
        let len = e.len as usize;
        let used = self.arena_used();
        if start + len <= used && used <= B {
            self.names.copy_within(start + len..used, start);
            self.used = (used - len) as u16;
        }
        if i < count && count <= N {
            self.entries.copy_within(i + 1..count, i);
            self.count -= 1;
        }
        for e in self.entries.iter_mut().take(self.count as usize).skip(i) {
            e.start = e.start.saturating_sub(len as u16);
        }
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        self.count = 0;
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_remove() {
        let mut t = TopicTable::<3, 16>::new();
        assert_eq!(t.insert(1, "a/b"), Ok(true));
        assert_eq!(t.insert(2, "c"), Ok(true));
        assert_eq!(t.insert(3, "dddd"), Ok(true));
        assert_eq!(t.insert(4, "e"), Err(Full));
        assert_eq!(t.insert(1, "a/b"), Ok(false));
        assert_eq!(t.name_of(2), Some("c"));
        assert!(t.remove_id(1));
        assert_eq!(t.name_of(3), Some("dddd"));
        assert_eq!(t.name_of(2), Some("c"));
        assert_eq!(t.arena_used(), 5);
        assert_eq!(t.insert(9, "c"), Ok(true));
        assert_eq!(t.id_of("c"), Some(9));
        assert_eq!(t.insert(9, "x"), Ok(true));
        assert_eq!(t.id_of("c"), None);
        assert_eq!(t.id_of("x"), Some(9));
        assert_eq!(t.len(), 2);
        assert_eq!(t.insert(10, "0123456789ab"), Err(Full));
        assert_eq!(t.insert(10, "0123456789a"), Ok(true));
        t.clear();
        assert_eq!(t.len(), 0);
        assert_eq!(t.name_of(9), None);
    }
}
