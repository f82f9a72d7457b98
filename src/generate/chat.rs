//! Fitting a conversation into the context: the system messages stay and the
//! oldest turns go first, so a chat keeps working however long it runs.

use super::tokenizer::{Message, Tokenizer};
use crate::error::{Error, Result};

/// What [`Engine::chat`](super::Engine::chat) does when the rendered
/// conversation and the room kept for the answer do not fit the context.
///
/// ```
/// use kvsieve::generate::{GenerateParams, Overflow};
/// let strict = GenerateParams { overflow: Overflow::Error, ..GenerateParams::default() };
/// assert_eq!(GenerateParams::default().overflow, Overflow::DropOldest);
/// # let _ = strict;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Drop the oldest messages after the system prompt, whole turns at a
    /// time (what is kept starts at a user message), until the conversation
    /// takes at most half its room where the last turn allows, so the next
    /// turns reuse the cached prefix;
    /// [`Generation::dropped_messages`](super::Generation::dropped_messages)
    /// says how many.
    #[default]
    DropOldest,
    /// Return [`Error::Capacity`].
    Error,
}

impl std::str::FromStr for Overflow {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "drop-oldest" => Ok(Self::DropOldest),
            "error" => Ok(Self::Error),
            o => Err(Error::InvalidOption(format!(
                "overflow {o:?}: expected drop-oldest or error"
            ))),
        }
    }
}

/// Token ids of `messages` rendered for an answer in at most `budget` tokens,
/// and how many messages were dropped for it (after the leading system ones).
pub(crate) fn fit(
    tok: &Tokenizer,
    messages: &[Message],
    budget: usize,
    overflow: Overflow,
) -> Result<(Vec<u32>, usize)> {
    let render = |m: &[Message]| -> Result<Vec<u32>> { tok.encode(&tok.render_chat(m, true)?) };
    let ids = render(messages)?;
    if ids.len() <= budget {
        return Ok((ids, 0));
    }
    if overflow == Overflow::Error {
        return Err(Error::Capacity(format!(
            "the conversation is {} tokens; the context holds {budget} besides the room kept for the answer",
            ids.len()
        )));
    }
    let system = messages.iter().take_while(|m| m.role == "system").count();
    let starts: Vec<usize> = (system..messages.len())
        .filter(|&i| messages[i].role == "user")
        .collect();
    let kept = |start: usize| -> Vec<Message> {
        messages[..system]
            .iter()
            .chain(&messages[start..])
            .cloned()
            .collect()
    };
    // Fewer messages render to fewer tokens: the earliest start that fits
    // `limit`, by bisection over the user messages.
    let earliest = |limit: usize| -> Result<Option<(Vec<u32>, usize)>> {
        let (mut lo, mut hi) = (0usize, starts.len());
        let mut best = None;
        while lo < hi {
            let mid = (lo + hi) / 2;
            let ids = render(&kept(starts[mid]))?;
            if ids.len() <= limit {
                best = Some((ids, starts[mid] - system));
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(best)
    };
    // Down to half the budget where the last turn allows (as llama.cpp's
    // context shift does): the next turns then append to the cached prefix
    // instead of recomputing everything after the system prompt each turn.
    let best = match earliest(budget / 2)? {
        Some(b) => Some(b),
        None => earliest(budget)?,
    };
    best.ok_or_else(|| {
        Error::Capacity(format!(
            "the system prompt and the last message take more than the {budget} tokens the context \
             holds besides the room kept for the answer; use a larger context or a shorter message"
        ))
    })
}

/// Why a [`Generation`](super::Generation) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full: what was generated is complete up to there.
    ContextFull,
    /// A step failed (the error was the last item).
    Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        // One token per character of a tiny alphabet; the template writes
        // "role:content|" per message.
        let vocab: serde_json::Map<String, serde_json::Value> = "abcdefghijklmnopqrstuvwxyz:|"
            .chars()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i.into()))
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "a"}
        });
        let cfg = serde_json::json!({
            "chat_template": "{% for m in messages %}{{ m.role[0] }}:{{ m.content }}|{% endfor %}"
        });
        Tokenizer::from_parts(json.to_string().as_bytes(), &cfg).unwrap()
    }

    #[test]
    fn oldest_turns_go_first_and_the_system_prompt_stays() {
        let t = tokenizer();
        let m = |r: &str, c: &str| Message::new(r, c);
        let conv = [
            m("system", "sys"),
            m("user", "aaaa"),
            m("assistant", "bbbb"),
            m("user", "cccc"),
            m("assistant", "dddd"),
            m("user", "eeee"),
        ];
        // Each message is 7 tokens ("u:aaaa|"), the system one 6: 41 in all.
        assert_eq!(fit(&t, &conv, 41, Overflow::DropOldest).unwrap().1, 0);
        // Over 40: down to half (20), the system prompt and the last turn.
        let (ids, dropped) = fit(&t, &conv, 40, Overflow::DropOldest).unwrap();
        assert_eq!((ids.len(), dropped), (13, 4));
        // Over 60 a turn more fits in half (27 of 30).
        let long: Vec<Message> = conv.iter().chain(&conv[1..]).cloned().collect();
        let (ids, dropped) = fit(&t, &long, 60, Overflow::DropOldest).unwrap();
        assert_eq!((ids.len(), dropped), (27, 7));
        let kept: Vec<&str> = long[..1]
            .iter()
            .chain(&long[1 + dropped..])
            .map(|m| m.content.as_str())
            .collect();
        assert_eq!(kept, ["sys", "cccc", "dddd", "eeee"]);
        // When half holds not even the last turn, the whole budget is used.
        assert_eq!(fit(&t, &conv, 14, Overflow::DropOldest).unwrap().1, 4);
        assert!(matches!(
            fit(&t, &conv, 12, Overflow::DropOldest),
            Err(Error::Capacity(_))
        ));
        assert!(matches!(
            fit(&t, &conv, 40, Overflow::Error),
            Err(Error::Capacity(_))
        ));
    }
}
