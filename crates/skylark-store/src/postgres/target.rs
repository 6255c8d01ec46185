//! Where a shard lives: a PostgreSQL URL, possibly naming several hosts.
//!
//! sqlx connects to one host; libpq's multi-host form
//! (`postgres://u@h1:5432,h2:5432/db?target_session_attrs=read-write`) is
//! read here into one set of connect options per host, tried in order. With
//! `target_session_attrs=read-write` (or `primary`), a host in recovery (a
//! standby) is passed over, so after a failover the promoted standby is
//! found by itself.

use crate::StoreError;
use sqlx::postgres::PgConnectOptions;
use std::str::FromStr;

#[derive(Debug, Clone)]
pub struct Target {
    /// One set of options per host, in the URL's order.
    pub hosts: Vec<PgConnectOptions>,
    /// Each host as `host:port`, for messages.
    pub names: Vec<String>,
    /// Only a server that accepts writes will do.
    pub read_write: bool,
    /// The URL with any password hidden, for messages and logs.
    pub shown: String,
}

fn bad(url: &str, why: &str) -> StoreError {
    StoreError::Unusable(format!("the store URL {} is not usable: {why}", hide_password(url)))
}

/// The URL with the password (if any) replaced by `***`.
pub fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{hosts}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, StoreError> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad(url, "it should start with postgres://"));
        };
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(bad(url, "it should start with postgres://"));
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), authority),
        };
        // target_session_attrs is libpq's; sqlx does not know it, so it is
        // taken out of the query here.
        let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
        let mut read_write = false;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("target_session_attrs", value)) => match value {
                    "read-write" | "primary" => read_write = true,
                    "any" => read_write = false,
                    other => {
                        return Err(bad(
                            url,
                            &format!("target_session_attrs={other} is not supported (use read-write or any)"),
                        ));
                    }
                },
                _ => kept.push(pair),
            }
        }
        let query = if kept.is_empty() { String::new() } else { format!("?{}", kept.join("&")) };
        let mut target = Target { hosts: Vec::new(), names: Vec::new(), read_write, shown: hide_password(url) };
        for host in hosts.split(',') {
            if host.is_empty() {
                return Err(bad(url, "a host is missing"));
            }
            let single = format!("postgres://{userinfo}{host}{path}{query}");
            let options =
                PgConnectOptions::from_str(&single).map_err(|e| bad(url, &e.to_string()))?.application_name("skylark");
            target.names.push(if host.contains(':') { host.to_owned() } else { format!("{host}:5432") });
            target.hosts.push(options);
        }
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_and_several() {
        let one = Target::parse("postgres://skylark@127.0.0.1:5433/chat").unwrap();
        assert_eq!((one.hosts.len(), one.read_write), (1, false));
        assert_eq!(one.hosts[0].get_port(), 5433);
        assert_eq!(one.hosts[0].get_database(), Some("chat"));

        let many = Target::parse(
            "postgres://u:secret@10.0.0.1:5432,10.0.0.2:6543/chat?target_session_attrs=read-write&sslmode=disable",
        )
        .unwrap();
        assert!(many.read_write);
        assert_eq!(many.names, vec!["10.0.0.1:5432", "10.0.0.2:6543"]);
        assert_eq!(many.hosts[1].get_port(), 6543);
        assert_eq!(many.hosts[1].get_username(), "u");
        assert!(!many.shown.contains("secret"), "{}", many.shown);
    }

    #[test]
    fn bad_urls_are_refused_in_words() {
        for url in ["mysql://x/y", "postgres://a,,b/db", "postgres://h/db?target_session_attrs=standby"] {
            match Target::parse(url) {
                Err(StoreError::Unusable(message)) => assert!(message.contains("not usable"), "{message}"),
                other => panic!("{url}: {other:?}"),
            }
        }
        assert_eq!(hide_password("postgres://u:pw@h/db"), "postgres://u:***@h/db");
    }
}
