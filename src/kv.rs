//! The paged KV cache's bookkeeping, below the ops interface and shared by both
//! executors: fixed-size pages handed out by an allocator, and a page table per
//! sequence. The executors own the storage
//! (arena buffers on the GPU, vectors on the CPU) and index it through the table.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};

/// Shape of a KV cache: the same page ids serve every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Transformer layers.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension (a multiple of 8, at most 128).
    pub head_dim: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Pages in the pool.
    pub num_pages: usize,
}

impl KvLayout {
    /// Checks the sizes the kernels rely on.
    pub fn validate(&self) -> Result<()> {
        if self.layers == 0 || self.kv_heads == 0 || self.page_size == 0 || self.num_pages == 0 {
            return Err(Error::InvalidOption(format!(
                "KV layout has a zero size: {self:?}"
            )));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(8) || self.head_dim > 128 {
            return Err(Error::InvalidOption(format!(
                "head_dim {} unsupported: must be a multiple of 8 and at most 128",
                self.head_dim
            )));
        }
        if self.num_pages > u32::MAX as usize / 2 {
            return Err(Error::InvalidOption(format!(
                "num_pages {} too large",
                self.num_pages
            )));
        }
        Ok(())
    }

    /// Half-precision values per page per layer for K (or V).
    pub fn page_elems(&self) -> usize {
        self.kv_heads * self.page_size * self.head_dim
    }

    /// Maximum tokens the pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.num_pages * self.page_size
    }
}

static NEXT_TABLE_ID: AtomicU64 = AtomicU64::new(1);

/// The pages of one sequence, in logical order, and its length in tokens.
#[derive(Debug)]
pub struct PageTable {
    id: u64,
    /// Page ids, page `i` holding logical positions `i * page_size ..`.
    pub pages: Vec<u32>,
    /// Tokens stored.
    pub len: usize,
}

impl PageTable {
    /// Unique id of this table (executors key their device copies by it).
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// Hands out pages of a pool.
#[derive(Debug)]
pub struct PageAllocator {
    page_size: usize,
    free: Vec<u32>,
}

impl PageAllocator {
    /// An allocator for `layout.num_pages` pages.
    pub fn new(layout: &KvLayout) -> Self {
        // Hand out low page ids first so short sequences stay in the first arena.
        Self {
            page_size: layout.page_size,
            free: (0..layout.num_pages as u32).rev().collect(),
        }
    }

    /// An empty sequence.
    pub fn new_sequence(&self) -> PageTable {
        PageTable {
            id: NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed),
            pages: Vec::new(),
            len: 0,
        }
    }

    /// Adds pages `old..num_pages` to the pool (after the cache grew to
    /// `num_pages`); they are handed out after the pages already free.
    pub fn grow(&mut self, old: usize, num_pages: usize) {
        let mut free: Vec<u32> = (old as u32..num_pages as u32).rev().collect();
        free.append(&mut self.free);
        self.free = free;
    }

    /// Pages still free.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Makes room for `new_len` tokens in `table`; fails without changing anything
    /// when the pool is exhausted.
    pub fn reserve(&mut self, table: &mut PageTable, new_len: usize) -> Result<()> {
        let need = new_len.div_ceil(self.page_size);
        if need > table.pages.len() {
            let extra = need - table.pages.len();
            if extra > self.free.len() {
                return Err(Error::Capacity(format!(
                    "KV cache full: {new_len} tokens need {extra} more pages of {} tokens, {} free",
                    self.page_size,
                    self.free.len()
                )));
            }
            for _ in 0..extra {
                let p = self
                    .free
                    .pop()
                    .ok_or_else(|| Error::Capacity("KV cache full".into()))?;
                table.pages.push(p);
            }
        }
        Ok(())
    }

    /// Returns a sequence's pages to the pool.
    pub fn release(&mut self, table: &mut PageTable) {
        self.free.extend(table.pages.drain(..).rev());
        table.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(pages: usize) -> KvLayout {
        KvLayout {
            layers: 1,
            kv_heads: 1,
            head_dim: 8,
            page_size: 4,
            num_pages: pages,
        }
    }

    #[test]
    fn reserve_grows_by_pages_and_release_returns_them() {
        let mut a = PageAllocator::new(&layout(5));
        let mut t = a.new_sequence();
        a.reserve(&mut t, 1).unwrap();
        assert_eq!(t.pages, vec![0]);
        a.reserve(&mut t, 4).unwrap();
        assert_eq!(t.pages.len(), 1, "4 tokens fit one page of 4");
        a.reserve(&mut t, 9).unwrap();
        assert_eq!(t.pages, vec![0, 1, 2]);
        assert_eq!(a.free_pages(), 2);
        let mut u = a.new_sequence();
        assert_ne!(t.id(), u.id());
        assert!(matches!(a.reserve(&mut u, 12), Err(Error::Capacity(_))));
        assert!(u.pages.is_empty(), "a failed reserve takes nothing");
        a.release(&mut t);
        assert_eq!(a.free_pages(), 5);
        a.reserve(&mut u, 12).unwrap();
        assert_eq!(u.pages, vec![0, 1, 2]);
    }

    #[test]
    fn layout_validation_names_the_problem() {
        let bad = KvLayout {
            head_dim: 12,
            ..layout(2)
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("head_dim 12"), "{e}");
        assert!(KvLayout {
            num_pages: 0,
            ..layout(2)
        }
        .validate()
        .is_err());
        assert!(layout(2).validate().is_ok());
    }
}
