//! The subset of containerd's filter syntax that snapshot walks use:
//! `field==value`, `field!=value`, comma for AND; a list of filters is OR.
//! Fields: `name`, `parent`, `kind`, `labels."key"` (or `labels.key`), and
//! `target`, which containerd's metadata layer means as the snapshot ref.

use std::collections::HashMap;

use super::store::SnapshotKind;

/// Errors parsing a filter.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("filter clause {clause:?} is not of the form field==value or field!=value")]
    Syntax { clause: String },
    #[error("filter field {field:?} is not supported")]
    Field { field: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Clause {
    field: Field,
    equal: bool,
    value: String,
}

/// A parsed list of filters (OR of ANDs).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    any_of: Vec<Vec<Clause>>,
}

const SNAPSHOT_REF_LABEL: &str = "containerd.io/snapshot.ref";

impl Filters {
    /// Parses containerd filter strings.
    pub fn parse(filters: &[String]) -> Result<Self, FilterError> {
        let mut any_of = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            let mut all = Vec::new();
            for clause in split_unquoted(f, ',') {
                all.push(parse_clause(clause.trim())?);
            }
            any_of.push(all);
        }
        Ok(Filters { any_of })
    }

    /// Whether a snapshot matches.
    pub fn matches(
        &self,
        name: &str,
        parent: &str,
        kind: SnapshotKind,
        labels: &HashMap<String, String>,
    ) -> bool {
        if self.any_of.is_empty() {
            return true;
        }
        self.any_of.iter().any(|all| {
            all.iter().all(|c| {
                let actual = match &c.field {
                    Field::Name => Some(name),
                    Field::Parent => Some(parent),
                    Field::Kind => Some(kind.as_str()),
                    Field::Label(k) => labels.get(k).map(String::as_str),
                };
                (actual == Some(c.value.as_str())) == c.equal
            })
        })
    }
}

fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(s)
        .to_string()
}

fn parse_clause(clause: &str) -> Result<Clause, FilterError> {
    let (field, equal, value) = if let Some((f, v)) = clause.split_once("!=") {
        (f, false, v)
    } else if let Some((f, v)) = clause.split_once("==") {
        (f, true, v)
    } else {
        return Err(FilterError::Syntax {
            clause: clause.to_string(),
        });
    };
    let field = field.trim();
    let field = match field {
        "name" => Field::Name,
        "parent" => Field::Parent,
        "kind" => Field::Kind,
        "target" => Field::Label(SNAPSHOT_REF_LABEL.to_string()),
        f => match f.strip_prefix("labels.") {
            Some(label) => Field::Label(unquote(label)),
            None => {
                return Err(FilterError::Field {
                    field: f.to_string(),
                })
            }
        },
    };
    Ok(Clause {
        field,
        equal,
        value: unquote(value),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_like_containerd() {
        let labels: HashMap<String, String> =
            [(SNAPSHOT_REF_LABEL.to_string(), "sha256:abc".to_string())].into();
        let f = Filters::parse(&["target==sha256:abc,parent==p".to_string()]).unwrap();
        assert!(f.matches("n", "p", SnapshotKind::Committed, &labels));
        assert!(!f.matches("n", "q", SnapshotKind::Committed, &labels));
        let f = Filters::parse(&[r#"labels."containerd.io/snapshot.ref"==sha256:abc"#.to_string()])
            .unwrap();
        assert!(f.matches("n", "", SnapshotKind::Active, &labels));
        let f = Filters::parse(&["kind==active".to_string(), "name==x".to_string()]).unwrap();
        assert!(f.matches("x", "", SnapshotKind::Committed, &labels));
        assert!(!f.matches("y", "", SnapshotKind::Committed, &labels));
        assert!(Filters::parse(&[])
            .unwrap()
            .matches("y", "", SnapshotKind::View, &labels));
        assert!(matches!(
            Filters::parse(&["size>3".to_string()]),
            Err(FilterError::Syntax { .. })
        ));
        assert!(matches!(
            Filters::parse(&["size==3".to_string()]),
            Err(FilterError::Field { .. })
        ));
    }
}
