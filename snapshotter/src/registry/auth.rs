//! `WWW-Authenticate` challenges (RFC 7235) as registries send them.

use std::collections::HashMap;

/// A parsed authentication challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses a single challenge; `None` for schemes we do not speak.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    let params = parse_params(params);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        }),
        _ => None,
    }
}

/// `scheme://host[:port]` of an absolute URL.
pub fn url_origin(url: &str) -> Option<&str> {
    let scheme_end = url.find("://")? + 3;
    let host_end = url[scheme_end..]
        .find(['/', '?', '#'])
        .map(|i| i + scheme_end)
        .unwrap_or(url.len());
    (host_end > scheme_end).then(|| &url[..host_end])
}

/// Whether a registry's basic credentials may go to the token server `realm`, named by the
/// registry at `registry_url`. Over HTTPS, yes: the registry chooses its token server (Docker
/// Hub's is another host). Over plain HTTP only to the registry's own origin, which already
/// gets them that way: never across the network to a host the registry named.
pub fn credentials_allowed(realm: &str, registry_url: &str) -> bool {
    if realm.starts_with("https://") {
        return true;
    }
    url_origin(realm).is_some() && url_origin(realm) == url_origin(registry_url)
}

fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, value.to_string());
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_to_https_realms_or_the_registrys_own_origin() {
        let registry = "http://127.0.0.1:5000/v2/a/manifests/1";
        assert!(credentials_allowed("https://auth.example/token", registry));
        assert!(credentials_allowed("http://127.0.0.1:5000/token", registry));
        assert!(!credentials_allowed("http://evil.example/token", registry));
        assert!(!credentials_allowed(
            "http://127.0.0.1:5001/token",
            registry
        ));
        assert!(!credentials_allowed(
            "http://127.0.0.1:5000/token",
            "https://127.0.0.1:5000/v2/"
        ));
        assert!(!credentials_allowed("ftp://x", registry));
        assert_eq!(url_origin("https://h:1/p?q"), Some("https://h:1"));
        assert_eq!(url_origin("https://h?q"), Some("https://h"));
        assert_eq!(url_origin("nonsense"), None);
    }

    #[test]
    fn parses_bearer_and_basic() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }
}
