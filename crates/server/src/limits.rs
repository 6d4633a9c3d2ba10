//! Process limits the server needs and can raise itself.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Raises the soft limit on open files to the hard limit: every connection is a file,
/// and the usual soft default (1 024) would cap a replica at about a thousand clients
/// while the hard limit (often 524 288 or more, set by the container runtime or
/// systemd) allows far more. Returns the limit now in force, when known.
pub fn raise_open_files() -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    let Some(hard) = limit.maximum else {
        // Unlimited hard limit: ask for a generous soft one instead.
        let wanted = 1 << 20;
        return setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(wanted),
                maximum: None,
            },
        )
        .map_or(limit.current, |()| Some(wanted));
    };
    if limit.current.is_some_and(|soft| soft >= hard) {
        return Some(hard);
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    ) {
        Ok(()) => Some(hard),
        Err(_) => limit.current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_one() {
        let raised = raise_open_files();
        let now = getrlimit(Resource::Nofile);
        assert_eq!(raised, now.current);
        assert_eq!(now.current, now.maximum.or(now.current));
    }
}
