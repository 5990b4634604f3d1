//! Unix users and groups by name and id, with the reentrant libc lookups (`getpwnam_r`,
//! `getgrnam_r`, `getpwuid_r`, `getgrouplist`), so any thread may ask. Who may use the agent's
//! socket, and which peer is slapd, are decided with these.

use std::ffi::CString;

/// A buffer for the reentrant lookups, grown on ERANGE up to 1 MiB.
fn with_buffer<T>(mut f: impl FnMut(&mut [libc::c_char]) -> Result<T, i32>) -> Result<T, i32> {
    let mut len = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; len];
        match f(&mut buf) {
            Err(libc::ERANGE) if len < (1 << 20) => len *= 4,
            other => return other,
        }
    }
}

/// Looks up a group's id by name (`getgrnam_r`: safe from any thread).
pub fn group_id(name: &str) -> Result<u32, String> {
    let c = CString::new(name).map_err(|_| format!("group name {name:?} contains a NUL byte"))?;
    let found = with_buffer(|buf| {
        // SAFETY: every pointer is valid for the call: grp and result are ours, buf has
        // buf.len() bytes; getgrnam_r writes only into them.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrnam_r(
                c.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 if result.is_null() => Ok(None),
            0 => Ok(Some(grp.gr_gid)),
            e => Err(e),
        }
    });
    match found {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) => Err(format!("no such group {name:?}")),
        Err(e) => Err(format!(
            "cannot look up group {name:?}: {}",
            std::io::Error::from_raw_os_error(e)
        )),
    }
}

/// Looks up a user's id by name (`getpwnam_r`: safe from any thread).
pub fn user_id(name: &str) -> Result<u32, String> {
    let c = CString::new(name).map_err(|_| format!("user name {name:?} contains a NUL byte"))?;
    let found = with_buffer(|buf| {
        // SAFETY: every pointer is valid for the call: pwd and result are ours, buf has
        // buf.len() bytes; getpwnam_r writes only into them.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                c.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 if result.is_null() => Ok(None),
            0 => Ok(Some(pwd.pw_uid)),
            e => Err(e),
        }
    });
    match found {
        Ok(Some(uid)) => Ok(uid),
        Ok(None) => Err(format!("no such user {name:?}")),
        Err(e) => Err(format!(
            "cannot look up user {name:?}: {}",
            std::io::Error::from_raw_os_error(e)
        )),
    }
}

/// Whether the user `uid` (primary group `gid`) belongs to group `want`.
pub fn in_group(uid: u32, gid: u32, want: u32) -> bool {
    if gid == want {
        return true;
    }
    let name = with_buffer(|buf| {
        // SAFETY: as in group_id, with getpwuid_r; the name is copied out of buf before it goes.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        match rc {
            0 if result.is_null() => Ok(None),
            // SAFETY: on success pw_name points to a NUL-terminated string inside buf.
            0 => Ok(Some(
                unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) }.to_owned(),
            )),
            e => Err(e),
        }
    });
    let Ok(Some(name)) = name else {
        return false;
    };
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: groups has room for n entries; getgrouplist writes at most n and updates n.
    let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
    if rc < 0 {
        return false;
    }
    groups.truncate(n.max(0) as usize);
    groups.contains(&want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_members_are_looked_up_from_any_thread() {
        let threads: Vec<_> = (0..8)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..200 {
                        assert_eq!(group_id("root"), Ok(0));
                        assert!(group_id("no-such-group-pwsync").is_err());
                        assert!(group_id("nul\0byte").is_err());
                        // root's primary group is root; a uid that does not exist is in nothing.
                        assert!(in_group(0, 0, 0));
                        assert!(!in_group(4_000_000_000, 4_000_000_000, 0));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("lookup thread");
        }
    }
}
