//! Build output as HTML: escaped, with ANSI SGR colours (the 8 colours,
//! their bright forms, bold) as `<span class="…">`, every other escape
//! sequence dropped.

/// One line of output (no newline) as HTML. Open spans are closed at the
/// end of the line; `state` carries the colour to the next line, as a
/// terminal would.
pub fn line_to_html(line: &str, state: &mut Style) -> String {
    let mut out = String::with_capacity(line.len() + 16);
    let mut open = state.open(&mut out);
    let mut chars = line.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '\u{1b}' => {
                if chars.peek() != Some(&'[') {
                    continue;
                }
                chars.next();
                let mut params = String::new();
                let mut end = None;
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        end = Some(c);
                        break;
                    }
                    params.push(c);
                }
                if end == Some('m') {
                    if open {
                        out.push_str("</span>");
                    }
                    state.apply(&params);
                    open = state.open(&mut out);
                }
            }
            '\r' => {}
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    if open {
        out.push_str("</span>");
    }
    out
}

/// The colour and weight in force.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    fg: Option<u8>,
    bold: bool,
}

impl Style {
    fn apply(&mut self, params: &str) {
        let codes: Vec<u16> = params.split(';').map(|p| p.parse().unwrap_or(0)).collect();
        let mut i = 0;
        while i < codes.len() {
            match codes[i] {
                0 => *self = Style::default(),
                1 => self.bold = true,
                22 => self.bold = false,
                c @ 30..=37 => self.fg = Some((c - 30) as u8),
                c @ 90..=97 => self.fg = Some((c - 90 + 8) as u8),
                39 => self.fg = None,
                // 256-colour and RGB forms: skip their arguments.
                38 | 48 => i += if codes.get(i + 1) == Some(&5) { 2 } else { 4 },
                _ => {}
            }
            i += 1;
        }
    }

    /// Opens a span for this style if it is not plain; whether it did.
    fn open(&self, out: &mut String) -> bool {
        if *self == Style::default() {
            return false;
        }
        out.push_str("<span class=\"");
        if let Some(c) = self.fg {
            out.push_str(&format!("c{c}"));
        }
        if self.bold {
            out.push_str(if self.fg.is_some() { " b" } else { "b" });
        }
        out.push_str("\">");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn html(s: &str) -> String {
        line_to_html(s, &mut Style::default())
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(html("a <b> & \"c\""), "a &lt;b&gt; &amp; &quot;c&quot;");
    }

    #[test]
    fn colours_become_spans_and_reset_closes_them() {
        assert_eq!(html("\x1b[31mred\x1b[0m plain"), "<span class=\"c1\">red</span> plain");
        assert_eq!(html("\x1b[1;92mok\x1b[m"), "<span class=\"c10 b\">ok</span>");
    }

    #[test]
    fn a_colour_carries_over_to_the_next_line() {
        let mut st = Style::default();
        assert_eq!(line_to_html("\x1b[33mwarn", &mut st), "<span class=\"c3\">warn</span>");
        assert_eq!(line_to_html("still", &mut st), "<span class=\"c3\">still</span>");
    }

    #[test]
    fn other_escapes_and_control_characters_are_dropped() {
        assert_eq!(html("a\x1b[2Kb\rc\x07d\x1b[38;5;200me"), "abcde");
    }
}
