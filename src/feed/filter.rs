//! SCIM filter expressions (RFC 7644 §3.4.2.2), for the system-of-record
//! feed: `status eq "Active"`, `userName co "billing"`,
//! `lastUsedDtm ge "2026-01-01"`, `not (lastUsedDtm pr)`,
//! `provider eq "zabbix" and (status eq "Dormant" or status eq "Disabled")`.
//!
//! Operators `eq ne co sw ew gt ge lt le pr`, `and`, `or`, `not (…)` and
//! parentheses, with `not` binding tighter than `and`, and `and` tighter
//! than `or`. Attribute names are case-insensitive, as SCIM says, and may
//! carry the core User schema's URN. Strings compare case-insensitively
//! (SCIM's default `caseExact: false`); dates compare as instants (a bare
//! date is its midnight UTC); a multi-valued attribute matches when any of
//! its values does. Unknown attributes are an error rather than no match,
//! so a typo never passes for an empty inventory.

use jiff::Timestamp;

/// The longest filter accepted.
pub const MAX_LEN: usize = 2048;
/// The deepest nesting accepted.
pub const MAX_DEPTH: usize = 32;
const USER_URN: &str = "urn:ietf:params:scim:schemas:core:2.0:user:";

/// An attribute's value in a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// A string.
    Str(String),
    /// A boolean.
    Bool(bool),
    /// An instant.
    Time(Timestamp),
    /// Several strings (roles).
    List(Vec<String>),
    /// No value.
    Null,
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `eq`
    Eq,
    /// `ne`
    Ne,
    /// `co`
    Co,
    /// `sw`
    Sw,
    /// `ew`
    Ew,
    /// `gt`
    Gt,
    /// `ge`
    Ge,
    /// `lt`
    Lt,
    /// `le`
    Le,
}

/// A literal in a filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// A JSON string.
    Str(String),
    /// `true` or `false`.
    Bool(bool),
    /// A number.
    Number(f64),
    /// `null`.
    Null,
}

/// A parsed filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// `attr pr`
    Present(String),
    /// `attr op value`
    Compare(String, Op, Literal),
    /// `not (f)`
    Not(Box<Filter>),
    /// `a and b`
    And(Box<Filter>, Box<Filter>),
    /// `a or b`
    Or(Box<Filter>, Box<Filter>),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Open,
    Close,
}

fn tokens(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                out.push(Token::Open);
            }
            ')' => {
                chars.next();
                out.push(Token::Close);
            }
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err("a string is not closed with \"".to_owned()),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('n') => s.push('\n'),
                            Some('t') => s.push('\t'),
                            Some(c @ ('"' | '\\' | '/')) => s.push(c),
                            _ => return Err("an unknown escape in a string".to_owned()),
                        },
                        Some(c) => s.push(c),
                    }
                }
                out.push(Token::Str(s));
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || c == '(' || c == ')' || c == '"' {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                out.push(Token::Word(word));
            }
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek_word(&self) -> Option<String> {
        match self.tokens.get(self.at) {
            Some(Token::Word(w)) => Some(w.to_ascii_lowercase()),
            _ => None,
        }
    }

    fn deeper(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("the filter nests deeper than {MAX_DEPTH}"));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Filter, String> {
        self.deeper()?;
        let mut left = self.and()?;
        while self.peek_word().as_deref() == Some("or") {
            self.at += 1;
            let right = self.and()?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        self.depth -= 1;
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, String> {
        let mut left = self.unary()?;
        while self.peek_word().as_deref() == Some("and") {
            self.at += 1;
            let right = self.unary()?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, String> {
        if self.peek_word().as_deref() == Some("not") {
            self.at += 1;
            if self.tokens.get(self.at) != Some(&Token::Open) {
                return Err("not must be followed by a parenthesized filter: not (…)".to_owned());
            }
            return Ok(Filter::Not(Box::new(self.group()?)));
        }
        if self.tokens.get(self.at) == Some(&Token::Open) {
            return self.group();
        }
        self.comparison()
    }

    fn group(&mut self) -> Result<Filter, String> {
        self.at += 1;
        let inner = self.or()?;
        if self.tokens.get(self.at) != Some(&Token::Close) {
            return Err("a parenthesis is not closed".to_owned());
        }
        self.at += 1;
        Ok(inner)
    }

    fn comparison(&mut self) -> Result<Filter, String> {
        let attribute = match self.tokens.get(self.at) {
            Some(Token::Word(w)) => w.clone(),
            Some(other) => return Err(format!("expected an attribute name, found {}", describe(other))),
            None => return Err("the filter ends where an attribute name was expected".to_owned()),
        };
        self.at += 1;
        let attribute = normalize(&attribute);
        let op = self.peek_word().ok_or_else(|| {
            format!("expected an operator after {attribute} (eq, ne, co, sw, ew, gt, ge, lt, le, pr)")
        })?;
        self.at += 1;
        let op = match op.as_str() {
            "pr" => return Ok(Filter::Present(attribute)),
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "co" => Op::Co,
            "sw" => Op::Sw,
            "ew" => Op::Ew,
            "gt" => Op::Gt,
            "ge" => Op::Ge,
            "lt" => Op::Lt,
            "le" => Op::Le,
            other => return Err(format!("{other:?} is not an operator (eq, ne, co, sw, ew, gt, ge, lt, le, pr)")),
        };
        let value = match self.tokens.get(self.at) {
            Some(Token::Str(s)) => Literal::Str(s.clone()),
            Some(Token::Word(w)) => match w.to_ascii_lowercase().as_str() {
                "true" => Literal::Bool(true),
                "false" => Literal::Bool(false),
                "null" => Literal::Null,
                _ => match w.parse::<f64>() {
                    Ok(n) => Literal::Number(n),
                    Err(_) => return Err(format!("{w:?} is not a value: quote strings, as in {attribute} eq \"{w}\"")),
                },
            },
            Some(other) => return Err(format!("expected a value, found {}", describe(other))),
            None => return Err(format!("the filter ends where a value for {attribute} was expected")),
        };
        self.at += 1;
        Ok(Filter::Compare(attribute, op, value))
    }
}

fn describe(token: &Token) -> String {
    match token {
        Token::Word(w) => format!("{w:?}"),
        Token::Str(s) => format!("the string {s:?}"),
        Token::Open => "(".to_owned(),
        Token::Close => ")".to_owned(),
    }
}

fn normalize(attribute: &str) -> String {
    let lower = attribute.to_ascii_lowercase();
    lower.strip_prefix(USER_URN).map(str::to_owned).unwrap_or(lower)
}

impl Filter {
    /// Parses `text`; the error says what is wrong, for a 400 answer.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_LEN {
            return Err(format!("the filter is longer than {MAX_LEN} characters"));
        }
        let tokens = tokens(text)?;
        if tokens.is_empty() {
            return Err("the filter is empty".to_owned());
        }
        let mut parser = Parser { tokens, at: 0, depth: 0 };
        let filter = parser.or()?;
        if let Some(extra) = parser.tokens.get(parser.at) {
            return Err(format!("unexpected {} after a complete filter (join filters with and / or)", describe(extra)));
        }
        Ok(filter)
    }

    /// Every attribute the filter names (lowercase), to check them first.
    pub fn attributes(&self) -> Vec<&str> {
        match self {
            Filter::Present(a) | Filter::Compare(a, ..) => vec![a.as_str()],
            Filter::Not(f) => f.attributes(),
            Filter::And(a, b) | Filter::Or(a, b) => {
                let mut out = a.attributes();
                out.extend(b.attributes());
                out
            }
        }
    }

    /// Whether a record matches; `field` gives an attribute's value by its
    /// lowercase name (`None`: no such attribute, checked beforehand).
    pub fn matches(&self, field: &dyn Fn(&str) -> Option<Field>) -> bool {
        match self {
            Filter::Present(a) => match field(a) {
                None | Some(Field::Null) => false,
                Some(Field::Str(s)) => !s.is_empty(),
                Some(Field::List(l)) => !l.is_empty(),
                Some(_) => true,
            },
            Filter::Compare(a, op, value) => field(a).is_some_and(|f| compare(&f, *op, value)),
            Filter::Not(f) => !f.matches(field),
            Filter::And(a, b) => a.matches(field) && b.matches(field),
            Filter::Or(a, b) => a.matches(field) || b.matches(field),
        }
    }
}

fn parse_time(text: &str) -> Option<Timestamp> {
    text.parse::<Timestamp>().ok().or_else(|| {
        text.parse::<jiff::civil::Date>()
            .ok()
            .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC).ok())
            .map(|z| z.timestamp())
    })
}

fn compare(field: &Field, op: Op, value: &Literal) -> bool {
    match (field, value) {
        (Field::Null, Literal::Null) => op == Op::Eq,
        (Field::Null, _) => op == Op::Ne,
        (_, Literal::Null) => op == Op::Ne,
        (Field::List(values), _) => values.iter().any(|v| compare(&Field::Str(v.clone()), op, value)),
        (Field::Bool(b), Literal::Bool(want)) => match op {
            Op::Eq => b == want,
            Op::Ne => b != want,
            _ => false,
        },
        (Field::Time(t), Literal::Str(s)) => match parse_time(s) {
            Some(want) => match op {
                Op::Eq => *t == want,
                Op::Ne => *t != want,
                Op::Gt => *t > want,
                Op::Ge => *t >= want,
                Op::Lt => *t < want,
                Op::Le => *t <= want,
                _ => false,
            },
            None => false,
        },
        (Field::Str(s), Literal::Str(want)) => {
            let (s, want) = (s.to_lowercase(), want.to_lowercase());
            match op {
                Op::Eq => s == want,
                Op::Ne => s != want,
                Op::Co => s.contains(&want),
                Op::Sw => s.starts_with(&want),
                Op::Ew => s.ends_with(&want),
                Op::Gt => s > want,
                Op::Ge => s >= want,
                Op::Lt => s < want,
                Op::Le => s <= want,
            }
        }
        _ => false,
    }
}

/// A date literal must parse: checked before any record is compared, so a
/// mistyped date is a 400 rather than an empty answer.
pub fn check_dates(filter: &Filter, is_date: &dyn Fn(&str) -> bool) -> Result<(), String> {
    match filter {
        Filter::Compare(a, _, Literal::Str(s)) if is_date(a) && parse_time(s).is_none() => {
            Err(format!("{s:?} is not a date or time for {a}: use 2026-01-31 or 2026-01-31T08:00:00Z"))
        }
        Filter::Not(f) => check_dates(f, is_date),
        Filter::And(a, b) | Filter::Or(a, b) => {
            check_dates(a, is_date)?;
            check_dates(b, is_date)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> Option<Field> {
        Some(match name {
            "status" => Field::Str("Active".into()),
            "username" => Field::Str("payments/billing-sync".into()),
            "active" => Field::Bool(true),
            "roles" => Field::List(vec!["host.get".into(), "problem.get".into()]),
            "lastuseddtm" => Field::Time("2026-06-01T10:00:00Z".parse().unwrap()),
            "owner" => Field::Null,
            _ => return None,
        })
    }

    fn matches(filter: &str) -> bool {
        Filter::parse(filter).unwrap_or_else(|e| panic!("{filter}: {e}")).matches(&record)
    }

    #[test]
    fn the_rfc_operators_and_precedence() {
        assert!(matches(r#"status eq "active""#), "strings compare case-insensitively");
        assert!(matches(r#"STATUS eq "Active""#), "attribute names too");
        assert!(matches(r#"urn:ietf:params:scim:schemas:core:2.0:User:userName sw "payments/""#));
        assert!(matches(r#"userName co "billing" and userName ew "sync""#));
        assert!(!matches(r#"status ne "Active""#));
        assert!(matches(r#"roles eq "problem.get""#), "any value of a multi-valued attribute");
        assert!(matches("active eq true") && !matches("active eq false"));
        assert!(matches(r#"lastUsedDtm ge "2026-01-01""#) && !matches(r#"lastUsedDtm lt "2026-06-01T09:59:59Z""#));
        assert!(matches("not (owner pr)") && matches("lastUsedDtm pr"));
        assert!(matches("owner eq null"));
        // and binds tighter than or; not tighter than and.
        assert!(matches(r#"status eq "x" and active eq false or active eq true"#));
        assert!(!matches(r#"status eq "x" and (active eq false or active eq true)"#));
        assert!(!matches(r#"not (active eq true) and status eq "Active""#));
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        for (bad, says) in [
            (r#"status eq Active"#, "quote strings"),
            (r#"status equals "x""#, "not an operator"),
            (r#"status eq "x"#, "not closed"),
            (r#"(status eq "x""#, "parenthesis"),
            (r#"status eq "x" "y""#, "after a complete filter"),
            (r#"not status eq "x""#, "parenthesized"),
            ("", "empty"),
        ] {
            let err = Filter::parse(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
        let deep = format!("{}status pr{}", "(".repeat(100), ")".repeat(100));
        assert!(Filter::parse(&deep).unwrap_err().contains("deeper"));
        assert!(Filter::parse(&"a".repeat(MAX_LEN + 1)).unwrap_err().contains("longer"));
        let f = Filter::parse(r#"lastUsedDtm gt "yesterday""#).unwrap();
        assert!(check_dates(&f, &|a| a == "lastuseddtm").unwrap_err().contains("not a date"));
    }
}
