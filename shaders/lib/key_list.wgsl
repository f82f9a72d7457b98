// lib/key_list.wgsl: the keys of a sparse step by rank (ops::KeyList). Ranks
// [0, n_init) are the sinks, then n_sel selected entries, then the window
// from tail_start. A block selection (block > 0, Quest) holds per KV head
// blocks_per_head block ids of `block` tokens; a token selection holds ids.
// The selection buffer is a kernel's global, so a kernel reads the word
// key_list_word names and passes it to key_list_logical.

struct KeyListView { n_init: u32, n_sel: u32, tail_start: u32, block: u32, blocks_per_head: u32 }

const NO_WORD: u32 = 0xffffffffu;

// The word of the selection buffer rank r of KV head kvh needs, or NO_WORD
// for a sink or window rank.
fn key_list_word(l: KeyListView, r: u32, kvh: u32) -> u32 {
    if (r < l.n_init || r >= l.n_init + l.n_sel) { return NO_WORD; }
    let i = r - l.n_init;
    if (l.block > 0u) { return kvh * l.blocks_per_head + i / l.block; }
    return i;
}

// Logical token index of rank r, `word` being the selection word
// key_list_word named (ignored for sinks and the window).
fn key_list_logical(l: KeyListView, r: u32, word: u32) -> u32 {
    if (r < l.n_init) { return r; }
    if (r < l.n_init + l.n_sel) {
        if (l.block > 0u) { return word * l.block + (r - l.n_init) % l.block; }
        return word;
    }
    return l.tail_start + (r - l.n_init - l.n_sel);
}
