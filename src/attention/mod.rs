//! The attention engine: KV cache bookkeeping and attention policies.

pub mod dense;
pub mod kv_cache;
pub mod policy;

pub use crate::ops::GqaMap;
pub use dense::dense_attention;
pub use kv_cache::{KvLayout, PageAllocator, PageTable};
pub use policy::{
    Attention, AttentionPolicy, Positions, QuestConfig, SelectionStats, TidalConfig,
    TokenSelectConfig,
};
