//! Plain templates: the ones that only print variables and test them
//! (`{{ name }}`, `{% if code %}…{% else %}…{% endif %}`), as every built-in
//! does, rendered without minijinja's VM.
//!
//! Why: callgrind put rendering at 33 k instructions a mail, 19 k of them in
//! minijinja's VM and its values, for three templates that are text with a
//! dozen substitutions. A plain template is compiled once into text pieces,
//! variables and branches; rendering it copies the pieces and escapes the
//! values, as minijinja would.
//!
//! Anything else (a filter, an expression, a comment, a loop, white-space
//! control, an unknown name) is not plain and stays with minijinja, and at
//! load every plain template is also rendered by minijinja with the start-up
//! check's samples: where the two differ, minijinja keeps it
//! ([`super::Templates::load`]).

use std::fmt::Write as _;

use super::render::write_html_escaped;

/// A variable the templates see (the module docs of `templates`, "Variables").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Var {
    Name,
    Email,
    Link,
    Code,
    Purpose,
    Locale,
    ExpiresAt,
    TtlSeconds,
    ValidFor,
    ValidForAmount,
    ValidForUnit,
    Subject,
}

impl Var {
    fn parse(ident: &str) -> Option<Self> {
        Some(match ident {
            "name" => Var::Name,
            "email" => Var::Email,
            "link" => Var::Link,
            "code" => Var::Code,
            "purpose" => Var::Purpose,
            "locale" => Var::Locale,
            "expires_at" => Var::ExpiresAt,
            "ttl_seconds" => Var::TtlSeconds,
            "valid_for" => Var::ValidFor,
            "valid_for_amount" => Var::ValidForAmount,
            "valid_for_unit" => Var::ValidForUnit,
            "subject" => Var::Subject,
            _ => return None,
        })
    }
}

/// One mail's values, as minijinja's templates see them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Values<'a> {
    pub name: Option<&'a str>,
    pub email: &'a str,
    pub link: Option<&'a str>,
    pub code: Option<&'a str>,
    pub purpose: &'a str,
    pub locale: &'a str,
    pub expires_at: &'a str,
    pub ttl_seconds: u64,
    pub valid_for: &'a str,
    pub valid_for_amount: u64,
    pub valid_for_unit: &'a str,
    /// Only in the text and HTML parts (compiling the subject refuses it).
    pub subject: &'a str,
}

/// A value as minijinja holds it: what it prints and whether it is true.
enum Value<'a> {
    Str(&'a str),
    None,
    Int(u64),
}

impl<'a> Values<'a> {
    fn get(&self, var: Var) -> Value<'a> {
        let text = |s: Option<&'a str>| s.map_or(Value::None, Value::Str);
        match var {
            Var::Name => text(self.name),
            Var::Email => Value::Str(self.email),
            Var::Link => text(self.link),
            Var::Code => text(self.code),
            Var::Purpose => Value::Str(self.purpose),
            Var::Locale => Value::Str(self.locale),
            Var::ExpiresAt => Value::Str(self.expires_at),
            Var::TtlSeconds => Value::Int(self.ttl_seconds),
            Var::ValidFor => Value::Str(self.valid_for),
            Var::ValidForAmount => Value::Int(self.valid_for_amount),
            Var::ValidForUnit => Value::Str(self.valid_for_unit),
            Var::Subject => Value::Str(self.subject),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Text(String),
    Print(Var),
    If {
        test: Var,
        then: Vec<Node>,
        otherwise: Vec<Node>,
    },
}

/// A compiled plain template.
#[derive(Debug, Clone)]
pub(super) struct Plain {
    nodes: Vec<Node>,
    /// Escape printed strings as HTML (the `.html` part).
    html: bool,
    /// The source's length: the output is about as long.
    size: usize,
}

impl Plain {
    /// Compiles `source` if it is plain; `None` sends it to minijinja.
    /// `subject` says whether the `subject` variable exists for this part.
    pub fn compile(source: &str, html: bool, subject: bool) -> Option<Self> {
        // minijinja's default: one trailing newline of the file is dropped.
        let mut source = source.strip_suffix('\n').unwrap_or(source);
        source = source.strip_suffix('\r').unwrap_or(source);
        let mut parser = Parser {
            rest: source,
            subject,
        };
        let (nodes, end) = parser.block()?;
        (end == End::Eof).then_some(Self {
            nodes,
            html,
            size: source.len(),
        })
    }

    /// Renders with `values` into a new string.
    pub fn render(&self, values: &Values<'_>) -> String {
        let mut out = String::with_capacity(self.size + 256);
        self.write(&self.nodes, values, &mut out);
        out
    }

    fn write(&self, nodes: &[Node], values: &Values<'_>, out: &mut String) {
        for node in nodes {
            match node {
                Node::Text(text) => out.push_str(text),
                Node::Print(var) => match values.get(*var) {
                    Value::Str(s) if self.html => {
                        // Writing into a String cannot fail.
                        let _ = write_html_escaped(out, s);
                    }
                    Value::Str(s) => out.push_str(s),
                    // minijinja prints none as Python does.
                    Value::None => out.push_str("None"),
                    Value::Int(n) => {
                        let _ = write!(out, "{n}");
                    }
                },
                Node::If {
                    test,
                    then,
                    otherwise,
                } => {
                    let truth = match values.get(*test) {
                        Value::Str(s) => !s.is_empty(),
                        Value::None => false,
                        Value::Int(n) => n != 0,
                    };
                    self.write(if truth { then } else { otherwise }, values, out);
                }
            }
        }
    }
}

/// What ended a block.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Eof,
    Else,
    Endif,
}

struct Parser<'s> {
    rest: &'s str,
    subject: bool,
}

impl Parser<'_> {
    /// Nodes up to the end of the source or the next `else`/`endif`; `None`
    /// when something is not plain.
    fn block(&mut self) -> Option<(Vec<Node>, End)> {
        let mut nodes = Vec::new();
        loop {
            let Some(at) = self.rest.find('{') else {
                push_text(&mut nodes, self.rest);
                self.rest = "";
                return Some((nodes, End::Eof));
            };
            let after = &self.rest[at + 1..];
            let (close, statement) = match after.as_bytes().first() {
                Some(b'{') => ("}}", false),
                Some(b'%') => ("%}", true),
                // A comment is not plain (minijinja keeps those few).
                Some(b'#') => return None,
                _ => {
                    push_text(&mut nodes, &self.rest[..=at]);
                    self.rest = after;
                    continue;
                }
            };
            push_text(&mut nodes, &self.rest[..at]);
            let inner_and_rest = &after[1..];
            let end = inner_and_rest.find(close)?;
            let inner = &inner_and_rest[..end];
            self.rest = &inner_and_rest[end + 2..];
            // White-space control (`{%-`, `-%}`, `+`) is not plain.
            if inner.starts_with(['-', '+']) || inner.ends_with(['-', '+']) {
                return None;
            }
            let inner = inner.trim_matches(char::is_whitespace);
            if !statement {
                nodes.push(Node::Print(self.var(inner)?));
                continue;
            }
            match inner {
                "else" => return Some((nodes, End::Else)),
                "endif" => return Some((nodes, End::Endif)),
                _ => {}
            }
            let test = inner.strip_prefix("if")?;
            if !test.starts_with(char::is_whitespace) {
                return None;
            }
            let test = self.var(test.trim_matches(char::is_whitespace))?;
            let (then, end) = self.block()?;
            let otherwise = match end {
                End::Endif => Vec::new(),
                End::Else => match self.block()? {
                    (otherwise, End::Endif) => otherwise,
                    _ => return None,
                },
                End::Eof => return None,
            };
            nodes.push(Node::If {
                test,
                then,
                otherwise,
            });
        }
    }

    /// A bare variable name the part knows; anything else is not plain.
    fn var(&self, ident: &str) -> Option<Var> {
        match Var::parse(ident)? {
            Var::Subject if !self.subject => None,
            var => Some(var),
        }
    }
}

/// Joins adjacent text so rendering copies one piece per run of text.
fn push_text(nodes: &mut Vec<Node>, text: &str) {
    if text.is_empty() {
        return;
    }
    match nodes.last_mut() {
        Some(Node::Text(last)) => last.push_str(text),
        _ => nodes.push(Node::Text(text.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::render::MAIL_VARS;
    use super::*;

    fn values() -> Values<'static> {
        Values {
            name: Some("A & <B>"),
            email: "a@example.com",
            link: Some("https://x.example/confirm/t?a=1&b='2'"),
            code: None,
            purpose: "verify_email",
            locale: "en",
            expires_at: "2027-01-15T08:00:00Z",
            ttl_seconds: 3600,
            valid_for: "1 hour",
            valid_for_amount: 1,
            valid_for_unit: "hour",
            subject: "Hi",
        }
    }

    #[test]
    fn what_is_not_plain_is_refused() {
        for source in [
            "{{ name|upper }}",
            "{{ name ~ email }}",
            "{{ 'x' }}",
            "{# a comment #}",
            "{{- name }}",
            "{{ name -}}",
            "{%- if name %}x{% endif %}",
            "{% if name == 'x' %}x{% endif %}",
            "{% if not name %}x{% endif %}",
            "{% if name %}x{% elif code %}y{% endif %}",
            "{% if name %}x",
            "{% if name %}x{% else %}y{% else %}z{% endif %}",
            "x{% endif %}",
            "{% for x in name %}{{ x }}{% endfor %}",
            "{% raw %}{{ name }}{% endraw %}",
            "{{ unknown }}",
            "{{ name }",
            "{% ifname %}x{% endif %}",
        ] {
            assert!(
                Plain::compile(source, false, true).is_none(),
                "{source} compiled as plain"
            );
        }
        // The subject template has no `subject` variable.
        assert!(Plain::compile("{{ subject }}", false, false).is_none());
        assert!(Plain::compile("{{ subject }}", false, true).is_some());
    }

    #[test]
    fn variables_print_and_test_as_in_minijinja() {
        let text = Plain::compile(
            "{% if name %}Hi {{name}}{% else %}Hi{% endif %}, {{ link }} {{ code }} {{\nttl_seconds }}{% if code %}!{% endif %}\n",
            false,
            true,
        )
        .expect("plain");
        assert_eq!(
            text.render(&values()),
            "Hi A & <B>, https://x.example/confirm/t?a=1&b='2' None 3600"
        );
        let html =
            Plain::compile("<p>{{ name }} {{ link }} { } {x}</p>", true, true).expect("plain");
        assert_eq!(
            html.render(&values()),
            "<p>A &amp; &lt;B&gt; https://x.example/confirm/t?a=1&amp;b=&#39;2&#39; { } {x}</p>"
        );
    }

    /// A random plain template, as source text: text with `{`, `}`, `%`,
    /// markup and non-ASCII, variables and branches nested two deep, with
    /// any white space inside the tags.
    fn template() -> impl Strategy<Value = String> {
        let text = prop::sample::select(vec![
            "a", "Hello ", "<p>", "&amp;", "\n", " ", "}", "%}", "#", "{ x", "é", "小", "=", "'",
            "\"", "\r\n",
        ])
        .prop_map(str::to_owned);
        let name = prop::sample::select(MAIL_VARS.to_vec());
        let space = prop::sample::select(vec!["", " ", "  ", "\n", "\t"]);
        let print = (space.clone(), name.clone(), space.clone())
            .prop_map(|(a, n, b)| format!("{{{{{a}{n}{b}}}}}"));
        let leaf = prop_oneof![3 => text, 2 => print];
        leaf.prop_recursive(2, 24, 6, move |inner| {
            let body = prop::collection::vec(inner, 0..5).prop_map(|v| v.concat());
            (
                name.clone(),
                space.clone(),
                body.clone(),
                prop::option::of(body),
            )
                .prop_map(|(n, s, then, otherwise)| match otherwise {
                    Some(o) => format!("{{%{s}if {n}{s}%}}{then}{{% else %}}{o}{{%endif%}}"),
                    None => format!("{{% if{s} {n} %}}{then}{{% endif {s}%}}"),
                })
        })
    }

    fn text_value() -> impl Strategy<Value = Option<String>> {
        prop::option::of(
            prop::sample::select(vec!["", " ", "Alice", "<b>&'\"</b>", "小明", "a=b"])
                .prop_map(str::to_owned),
        )
    }

    proptest! {
        #[test]
        fn a_plain_template_renders_as_minijinja_renders_it(
            pieces in prop::collection::vec(template(), 1..6),
            trailing_newline in any::<bool>(),
            html in any::<bool>(),
            name in text_value(),
            link in text_value(),
            code in text_value(),
            ttl in prop::sample::select(vec![0u64, 1, 3600]),
        ) {
            let mut source = pieces.concat();
            if trailing_newline {
                source.push('\n');
            }
            let plain = Plain::compile(&source, html, true);
            prop_assert!(plain.is_some(), "not plain: {source:?}");
            let values = Values {
                name: name.as_deref(),
                email: "o'neil@example.com",
                link: link.as_deref(),
                code: code.as_deref(),
                purpose: "verify_email",
                locale: "en",
                expires_at: "2027-01-15T08:00:00Z",
                ttl_seconds: ttl,
                valid_for: "1 hour",
                valid_for_amount: ttl / 3600,
                valid_for_unit: "<hour>",
                subject: "Hi & bye",
            };
            let mut env = super::super::load::environment();
            let file = if html { "t.html" } else { "t.txt" };
            env.add_template_owned(file, source.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let jinja = env
                .get_template(file)
                .and_then(|t| {
                    t.render(minijinja::context! {
                        name => values.name,
                        email => values.email,
                        link => values.link,
                        code => values.code,
                        purpose => values.purpose,
                        locale => values.locale,
                        expires_at => values.expires_at,
                        ttl_seconds => values.ttl_seconds,
                        valid_for => values.valid_for,
                        valid_for_amount => values.valid_for_amount,
                        valid_for_unit => values.valid_for_unit,
                        subject => values.subject,
                    })
                })
                .map_err(|e| TestCaseError::fail(format!("{source:?}: {e}")))?;
            prop_assert_eq!(plain.map(|p| p.render(&values)), Some(jinja), "{:?}", source);
        }
    }
}
