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
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
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
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| Error::InvalidOption(format!("tokenize: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
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
        let t = env.get_template("chat").map_err(bad)?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::InvalidOption(format!("chat template: {e}")))
    }
}
