//! Evaluation tasks shared by the tests and examples: passkey retrieval
//! (docs/ALGORITHMS.md section 7), teacher-forced next-token agreement and the
//! recall of an approximate selection against an exact one.

use crate::error::{Error, Result};
use crate::generate::{Engine, GenerateParams, Tokenizer};

const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. \
Find it and memorize them. I will quiz you about the important information there.";
const FILLER: &str =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const QUESTION: &str = " What is the pass key? The pass key is";

/// The haystack of a passkey prompt: the text the key hides in.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Filler {
    /// The classic five sentences, repeated (docs/ALGORITHMS.md section 7).
    #[default]
    Repeat,
    /// Sentences drawn from small word lists by a fixed sequence: no run of
    /// sentences repeats and there are no digits to mistake for the key.
    Varied,
    /// Any text, split into sentences and cycled (numbers in it are
    /// distractors).
    Text(String),
}

impl Filler {
    /// The filler named `repeat` or `varied`.
    pub fn named(name: &str) -> Result<Filler> {
        match name {
            "repeat" => Ok(Filler::Repeat),
            "varied" => Ok(Filler::Varied),
            _ => Err(Error::InvalidOption(format!(
                "unknown filler {name:?} (repeat, varied, or a text)"
            ))),
        }
    }
}

/// Sentence `i` of [`Filler::Varied`]: word choices from a splitmix hash of
/// `i`, so the sequence is the same on every machine.
fn varied_sentence(i: usize) -> String {
    const NAMES: [&str; 12] = [
        "Mara", "Tobias", "Ines", "Kofi", "Lena", "Ravi", "Sofia", "Omar", "Hana", "Piet", "Yara",
        "Dmitri",
    ];
    const VERBS: [&str; 12] = [
        "carried",
        "painted",
        "found",
        "repaired",
        "sold",
        "borrowed",
        "watched",
        "cleaned",
        "described",
        "hid",
        "measured",
        "photographed",
    ];
    const ADJS: [&str; 12] = [
        "old", "quiet", "bright", "narrow", "wooden", "silver", "heavy", "small", "crooked",
        "green", "distant", "careful",
    ];
    const NOUNS: [&str; 12] = [
        "lantern", "boat", "letter", "garden", "bridge", "clock", "basket", "window", "map",
        "violin", "kettle", "ladder",
    ];
    const PLACES: [&str; 12] = [
        "harbour",
        "market",
        "library",
        "orchard",
        "station",
        "valley",
        "kitchen",
        "workshop",
        "meadow",
        "museum",
        "courtyard",
        "forest",
    ];
    let mut h = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let mut pick = |n: usize| {
        let v = (h % n as u64) as usize;
        h /= n as u64;
        v
    };
    let (name, verb, adj) = (NAMES[pick(12)], VERBS[pick(12)], ADJS[pick(12)]);
    let (noun, place) = (NOUNS[pick(12)], PLACES[pick(12)]);
    match pick(4) {
        0 => format!(" {name} {verb} the {adj} {noun} near the {place}."),
        1 => format!(" In the {place}, {name} {verb} a {adj} {noun}."),
        2 => format!(" Nobody expected the {noun} in the {place} to look so {adj}."),
        _ => format!(" The {adj} {noun} stayed in the {place} while {name} {verb} it."),
    }
}

/// A passkey prompt of about `tokens` tokens with `key` inserted after a share
/// `depth` (0..=1) of the `filler`'s sentences.
///
/// ```no_run
/// use kvsieve::eval::{passkey_prompt, Filler};
/// use kvsieve::generate::Tokenizer;
/// let tok = Tokenizer::load(&kvsieve::convert::default_model_dir()?)?;
/// let ids = passkey_prompt(&tok, 4096, 0.5, 68437, &Filler::Varied)?;
/// assert!(ids.len() <= 4096);
/// # Ok::<(), kvsieve::Error>(())
/// ```
pub fn passkey_prompt(
    tok: &Tokenizer,
    tokens: usize,
    depth: f64,
    key: u32,
    filler: &Filler,
) -> Result<Vec<u32>> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(Error::InvalidOption(format!(
            "depth {depth} must be in 0..=1"
        )));
    }
    let needle = format!(" The pass key is {key}. Remember it. {key} is the pass key.");
    let fixed = tok.encode(&format!("{INTRO}{needle}{QUESTION}"))?.len();
    let budget = tokens.saturating_sub(fixed + 2);
    // The classic filler's prompts stay what they were: a count of
    // repetitions from the mean length of one.
    let units = match filler {
        Filler::Repeat => {
            let per = tok.encode(&FILLER.repeat(8))?.len() as f64 / 8.0;
            vec![FILLER.to_string(); (budget as f64 / per).floor() as usize]
        }
        Filler::Varied => fill(tok, budget, varied_sentence)?,
        Filler::Text(t) => {
            let sentences: Vec<&str> = t
                .split_inclusive(['.', '!', '?'])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            if sentences.is_empty() {
                return Err(Error::InvalidOption("the filler text is empty".into()));
            }
            fill(tok, budget, |i| {
                format!(" {}", sentences[i % sentences.len()])
            })?
        }
    };
    let before = (units.len() as f64 * depth).round() as usize;
    let text = format!(
        "{INTRO}{}{needle}{}{QUESTION}",
        units[..before].concat(),
        units[before..].concat()
    );
    let mut ids = tok.encode(&text)?;
    ids.truncate(tokens);
    Ok(ids)
}

/// Sentences `unit(0), unit(1), ..` (each with a leading space) while their
/// tokens fit in `budget`.
fn fill(tok: &Tokenizer, budget: usize, unit: impl Fn(usize) -> String) -> Result<Vec<String>> {
    let (mut units, mut used) = (Vec::new(), 0);
    loop {
        let u = unit(units.len());
        used += tok.encode(&u)?.len();
        if used > budget {
            return Ok(units);
        }
        units.push(u);
    }
}

/// The first integer in `text`, if any.
pub fn first_integer(text: &str) -> Option<u64> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let digits: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// One passkey trial: greedy-generates 7 tokens after the prompt (reusing the
/// engine's cached prefix) and returns whether the key came back, and the answer.
pub fn passkey_trial(
    engine: &mut Engine,
    tokens: usize,
    depth: f64,
    key: u32,
    filler: &Filler,
) -> Result<(bool, String)> {
    let ids = passkey_prompt(&engine.tokenizer, tokens, depth, key, filler)?;
    let params = GenerateParams {
        max_tokens: 7,
        stop_at_eos: true,
        ..Default::default()
    };
    let mut text = String::new();
    for t in engine.generate_ids(&ids, &params)? {
        text.push_str(&t?.text);
    }
    Ok((first_integer(&text) == Some(key as u64), text))
}

/// Teacher-forced greedy predictions: the argmax of the next-token logits
/// after each prefix `ids[..end]`, `end` in `from..=ids.len()` (the engine
/// reuses its cache, so each step decodes one token).
///
/// ```no_run
/// use kvsieve::eval::teacher_forced_argmaxes;
/// use kvsieve::generate::{Engine, Options};
/// let mut e = Engine::load_default(Options::default())?;
/// let ids = e.tokenizer.encode("The grass is green. The sky is blue. The sun is")?;
/// let preds = teacher_forced_argmaxes(&mut e, &ids, ids.len() - 3)?;
/// assert_eq!(preds.len(), 4);
/// # Ok::<(), kvsieve::Error>(())
/// ```
pub fn teacher_forced_argmaxes(engine: &mut Engine, ids: &[u32], from: usize) -> Result<Vec<u32>> {
    if from == 0 || from > ids.len() {
        return Err(Error::InvalidOption(format!(
            "first prefix length {from} must be in 1..={}",
            ids.len()
        )));
    }
    let mut out = Vec::with_capacity(ids.len() + 1 - from);
    for end in from..=ids.len() {
        engine.prefill(&ids[..end])?;
        out.push(crate::reference::argmax_row(&engine.logits()?));
    }
    Ok(out)
}

/// Share of equal entries of two prediction lists.
pub fn agreement(a: &[u32], b: &[u32]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

/// Mean recall of `approx`'s selections against `exact`'s: after each prefix
/// `ids[..end]` (`end` in `from..=ids.len()`, both engines stepping in
/// lockstep), for every layer, the share of the tokens `exact` selected that
/// `approx` selected too. Both engines should run TokenSelect without the
/// Selection Cache, so that every step selects in every layer.
pub fn selection_recall(
    exact: &mut Engine,
    approx: &mut Engine,
    ids: &[u32],
    from: usize,
) -> Result<f64> {
    let (mut sum, mut count) = (0.0, 0usize);
    for end in from.max(1)..=ids.len() {
        exact.prefill(&ids[..end])?;
        approx.prefill(&ids[..end])?;
        for layer in 0..exact.config.layers {
            let (Some(e), Some(a)) = (exact.selected(layer)?, approx.selected(layer)?) else {
                continue;
            };
            let a: std::collections::HashSet<u32> = a.into_iter().collect();
            sum += e.iter().filter(|t| a.contains(t)).count() as f64 / e.len().max(1) as f64;
            count += 1;
        }
    }
    if count == 0 {
        return Err(Error::InvalidOption(
            "selection recall: neither engine selected (context within the budget?)".into(),
        ));
    }
    Ok(sum / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_integer_parses_the_answer() {
        assert_eq!(first_integer(" 68437. Remember"), Some(68437));
        assert_eq!(first_integer(" is 12 and 13"), Some(12));
        assert_eq!(first_integer(" none"), None);
    }

    #[test]
    fn varied_filler_has_no_digits_and_does_not_cycle_soon() {
        let s: Vec<String> = (0..2000).map(varied_sentence).collect();
        assert!(s.iter().all(|x| !x.contains(|c: char| c.is_ascii_digit())));
        let distinct: std::collections::HashSet<&String> = s.iter().collect();
        assert!(distinct.len() > 1500, "{} distinct of 2000", distinct.len());
        assert_eq!(varied_sentence(7), s[7]);
        assert!(Filler::named("nope").is_err());
    }
}
