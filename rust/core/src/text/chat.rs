//! Chat templates (Jinja, as stored in GGUF metadata or `tokenizer_config.json`), rendered in Rust.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// A user turn.
    pub fn user(content: &str) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// The roles chat templates are written for.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Template instructions one render may run: real chat templates need a few per message, so this
/// only stops templates that loop without end.
const FUEL: u64 = 5_000_000;
/// Bytes one render may produce: far beyond any model's context, far below a machine's memory.
const MAX_RENDER_BYTES: usize = 16 << 20;

/// Collects a render's output, failing once it passes [`MAX_RENDER_BYTES`].
struct BoundedOutput(Vec<u8>);

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDER_BYTES {
            return Err(std::io::Error::other("output limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn raise_exception(msg: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        // Templates written for Python's Jinja call str methods such as .strip() and .startswith().
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.set_fuel(Some(FUEL));
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::ChatTemplate(format!("template does not parse: {e}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::invalid("a chat needs at least one message"));
        }
        if let Some((i, m)) = messages
            .iter()
            .enumerate()
            .find(|(_, m)| !ROLES.contains(&m.role.as_str()))
        {
            return Err(Error::invalid(format!(
                "message {i} has role '{}': expected one of {}",
                m.role,
                ROLES.join(", ")
            )));
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let mut out = BoundedOutput(Vec::new());
        let rendered = tmpl.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            },
            &mut out,
        );
        if let Err(e) = rendered {
            return Err(Error::ChatTemplate(
                if e.kind() == ErrorKind::WriteFailure {
                    format!("cannot render: the output passed {MAX_RENDER_BYTES} bytes")
                } else if e.kind() == ErrorKind::OutOfFuel {
                    format!("cannot render: the template ran more than {FUEL} instructions (a loop without end?)")
                } else {
                    format!("cannot render: {e}")
                },
            ));
        }
        let text = String::from_utf8(out.0)
            .map_err(|_| Error::ChatTemplate("the template rendered invalid UTF-8".into()))?;
        if text.trim().is_empty() {
            return Err(Error::ChatTemplate(
                "the template renders these messages as an empty prompt".into(),
            ));
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(s: &str) -> ChatMessage {
        ChatMessage::user(s)
    }

    #[test]
    fn renders_chatml_with_default_system_prompt() {
        let t = ChatTemplate::new(SMOL, None, Some("<|im_end|>")).unwrap();
        let out = t.render(&[user("Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip() }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&[user("  x  ")], false).unwrap(), "x");
        let err = t
            .render(
                &[ChatMessage {
                    role: "system".into(),
                    content: "s".into(),
                }],
                false,
            )
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn unknown_roles_and_empty_renders_are_errors() {
        let t = ChatTemplate::new(SMOL, None, None).unwrap();
        let wizard = ChatMessage {
            role: "wizard".into(),
            content: "hi".into(),
        };
        let err = t.render(&[user("a"), wizard], true).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(
            err.to_string().contains("message 1 has role 'wizard'"),
            "{err}"
        );
        let blank = ChatTemplate::new("{% for m in messages %} {% endfor %}", None, None).unwrap();
        let err = blank.render(&[user("hi")], false).unwrap_err();
        assert!(matches!(err, Error::ChatTemplate(_)), "{err}");
        assert!(err.to_string().contains("empty prompt"), "{err}");
    }

    #[test]
    fn endless_loops_and_huge_outputs_are_errors() {
        let endless = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let err = endless.render(&[user("hi")], false).unwrap_err();
        assert!(err.to_string().contains("instructions"), "{err}");
        let huge = ChatTemplate::new(
            "{% for i in range(1000) %}{{ 'abcd' * 1000000 }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let err = huge.render(&[user("hi")], false).unwrap_err();
        assert!(err.to_string().contains("output passed"), "{err}");
    }
}
