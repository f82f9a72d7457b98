//! Evaluation tasks shared by the tests and examples: passkey retrieval
//! (ALGORITHMS.md section 7).

use crate::error::{Error, Result};
use crate::generate::{Engine, GenerateParams, Tokenizer};

const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. \
Find it and memorize them. I will quiz you about the important information there.";
const FILLER: &str =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const QUESTION: &str = " What is the pass key? The pass key is";

/// A passkey prompt of about `tokens` tokens with `key` inserted after a share
/// `depth` (0..=1) of the filler.
///
/// ```no_run
/// use kvsieve::eval::passkey_prompt;
/// use kvsieve::generate::Tokenizer;
/// let tok = Tokenizer::load(&kvsieve::convert::default_model_dir()?)?;
/// let ids = passkey_prompt(&tok, 4096, 0.5, 68437)?;
/// assert!(ids.len() <= 4096);
/// # Ok::<(), kvsieve::Error>(())
/// ```
pub fn passkey_prompt(tok: &Tokenizer, tokens: usize, depth: f64, key: u32) -> Result<Vec<u32>> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(Error::InvalidOption(format!(
            "depth {depth} must be in 0..=1"
        )));
    }
    let needle = format!(" The pass key is {key}. Remember it. {key} is the pass key.");
    let fixed = tok.encode(&format!("{INTRO}{needle}{QUESTION}"))?.len();
    let per = tok.encode(&FILLER.repeat(8))?.len() as f64 / 8.0;
    let reps = ((tokens.saturating_sub(fixed + 2)) as f64 / per).floor() as usize;
    let before = (reps as f64 * depth).round() as usize;
    let text = format!(
        "{INTRO}{}{needle}{}{QUESTION}",
        FILLER.repeat(before),
        FILLER.repeat(reps - before)
    );
    let mut ids = tok.encode(&text)?;
    ids.truncate(tokens);
    Ok(ids)
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
) -> Result<(bool, String)> {
    let ids = passkey_prompt(&engine.tokenizer, tokens, depth, key)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_integer_parses_the_answer() {
        assert_eq!(first_integer(" 68437. Remember"), Some(68437));
        assert_eq!(first_integer(" is 12 and 13"), Some(12));
        assert_eq!(first_integer(" none"), None);
    }
}
