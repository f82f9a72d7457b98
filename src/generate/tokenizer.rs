//! Tokenizer (`tokenizer.json` through the `tokenizers` crate) and chat prompts
//! rendered from the model's own template (`tokenizer_config.json`) with minijinja.

use crate::error::{Error, Result};
use serde::Serialize;
use std::path::Path;

/// One chat message.
///
/// ```
/// let m = kvsieve::Message::new("user", "Hello");
/// assert_eq!((m.role.as_str(), m.content.as_str()), ("user", "Hello"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    /// Text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Runs a call into the `tokenizers` crate, which panics on some malformed
/// tokenizer files (tokenizers 0.22 `expect`s a decoder nested past serde's
/// recursion limit): the panic becomes an error naming `what`. (Builds with
/// `panic = "abort"` cannot contain it.)
fn contained<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("");
        Error::malformed(format!(
            "{what}: the tokenizers library failed on this tokenizer ({msg})"
        ))
    })
}

/// Longest added token, and most bytes of added tokens in all: real special
/// tokens are tens of bytes. `tokenizers` matches added tokens with an
/// Aho-Corasick automaton whose construction is quadratic in a token's length
/// (a 95 KB token took minutes), so longer ones are refused before it sees them.
const ADDED_TOKEN_MAX: usize = 1 << 10;
const ADDED_TOKENS_TOTAL_MAX: usize = 1 << 20;

fn check_added_tokens(tokenizer_json: &[u8]) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Added {
        content: String,
    }
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        added_tokens: Vec<Added>,
    }
    // A file this does not read is left to the tokenizers library's own error.
    let Ok(f) = serde_json::from_slice::<File>(tokenizer_json) else {
        return Ok(());
    };
    let mut total = 0;
    for (i, t) in f.added_tokens.iter().enumerate() {
        total += t.content.len();
        if t.content.len() > ADDED_TOKEN_MAX || total > ADDED_TOKENS_TOTAL_MAX {
            return Err(Error::malformed(format!(
                "added token {i} is {} bytes long ({total} bytes so far; at most {ADDED_TOKEN_MAX} \
                 a token and {ADDED_TOKENS_TOTAL_MAX} in all)",
                t.content.len()
            )));
        }
    }
    Ok(())
}

/// Tokenizer plus chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<String>,
    bos_token: String,
    eos_token: String,
}

fn token_str(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| Error::format(&cfg_path, format!("malformed: {e}")))?,
            // Optional: without it there is no chat template or special tokens.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => return Err(Error::io(&cfg_path, e)),
        };
        Self::from_parts(&text, &cfg).map_err(|e| e.in_file(&path))
    }

    /// A tokenizer from `tokenizer.json` text and `tokenizer_config.json`'s
    /// value (chat template, special tokens; `Null` for none).
    pub fn from_parts(tokenizer_json: &[u8], cfg: &serde_json::Value) -> Result<Self> {
        check_added_tokens(tokenizer_json)?;
        let inner = contained("tokenizer.json", || {
            tokenizers::Tokenizer::from_bytes(tokenizer_json)
        })?
        .map_err(|e| Error::malformed(format!("malformed tokenizer: {e}")))?;
        Ok(Self {
            inner,
            template: cfg
                .get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string),
            bos_token: token_str(cfg.get("bos_token")),
            eos_token: token_str(cfg.get("eos_token")),
        })
    }

    /// Token ids of `text`; special tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(contained("tokenize", || self.inner.encode(text, false))?
            .map_err(|e| Error::InvalidOption(format!("tokenize: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        contained("detokenize", || self.inner.decode(ids, true))?
            .map_err(|e| Error::InvalidOption(format!("detokenize: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders `messages` with the model's chat template.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tpl = self.template.as_deref().ok_or_else(|| {
            Error::Unsupported("the model has no chat_template in tokenizer_config.json".into())
        })?;
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        // A template that does not parse is a defect of the model's files.
        let bad = |e: minijinja::Error| {
            Error::format("tokenizer_config.json", format!("chat_template: {e}"))
        };
        env.add_template("chat", tpl).map_err(bad)?;
        // A template is a program from the model's files: bound its work and its
        // output, so an endless loop or a huge repeat is an error, not a hang or
        // an out-of-memory.
        env.set_fuel(Some(TEMPLATE_FUEL));
        let t = env.get_template("chat").map_err(bad)?;
        let mut out = BoundedText(Vec::new());
        let rendered = t.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            },
            &mut out,
        );
        match rendered {
            Ok(_) => String::from_utf8(out.0).map_err(|e| {
                Error::InvalidOption(format!("chat template: output is not UTF-8: {e}"))
            }),
            Err(e) if e.kind() == minijinja::ErrorKind::WriteFailure => Err(Error::InvalidOption(
                format!("chat template: output past {TEMPLATE_OUTPUT_MAX} bytes"),
            )),
            Err(e) => Err(Error::InvalidOption(format!("chat template: {e}"))),
        }
    }
}

/// Instructions a chat template may run for one rendering (a conversation of
/// thousands of turns takes well under a million).
const TEMPLATE_FUEL: u64 = 20_000_000;
/// Bytes a chat template may write: far past any context window's worth of text.
const TEMPLATE_OUTPUT_MAX: usize = 64 << 20;

/// A writer that refuses to grow past [`TEMPLATE_OUTPUT_MAX`].
struct BoundedText(Vec<u8>);

impl std::io::Write for BoundedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > TEMPLATE_OUTPUT_MAX {
            return Err(std::io::Error::other("chat template output too long"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_template(tpl: &str) -> Tokenizer {
        let vocab = br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"a":0},"unk_token":"a"}}"#;
        Tokenizer::from_parts(vocab, &serde_json::json!({ "chat_template": tpl })).unwrap()
    }

    #[test]
    fn hostile_templates_are_errors_not_hangs() {
        let msgs = [Message::new("user", "hi")];
        let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
        assert_eq!(
            with_template(chatml).render_chat(&msgs, false).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n"
        );
        // A long conversation stays well inside the bounds.
        let many: Vec<Message> = (0..5000)
            .map(|i| Message::new("user", &format!("turn {i}")))
            .collect();
        assert!(with_template(chatml).render_chat(&many, false).is_ok());
        for (what, tpl, needle) in [
            (
                "endless loop",
                "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}{% endfor %}{% endfor %}{% endfor %}",
                "fuel",
            ),
            (
                "huge output",
                "{% set x = 'a' * 50000000 %}{% for i in range(1000) %}{{ x }}{% endfor %}",
                "output past",
            ),
            (
                "recursion",
                "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                "chat template",
            ),
        ] {
            let t0 = std::time::Instant::now();
            let e = with_template(tpl).render_chat(&msgs, false).unwrap_err().to_string();
            assert!(e.contains(needle), "{what}: {e}");
            assert!(t0.elapsed().as_secs() < 20, "{what} took {:?}", t0.elapsed());
        }
    }
}
