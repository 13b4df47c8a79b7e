//! The container's last step: `execve` of the process, with the
//! environment passed explicitly.
//!
//! libcontainer's default executor rewrites the environment with
//! `std::env::{remove_var,set_var}`, which take the standard library's
//! global environment lock. The container is cloned from a multi-threaded
//! process; if another thread held that lock at clone time, the child
//! waits on it forever. This executor never touches the process
//! environment: it builds `envp` from the spec and calls `execve`. It also
//! ties the container's life to its starter's with `PR_SET_PDEATHSIG`.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};

/// Executes `process.args` with exactly `process.env`.
#[derive(Clone, Default)]
pub struct ExecveExecutor;

fn process_parts(spec: &Spec) -> Option<(&Vec<String>, Vec<String>)> {
    let p = spec.process().as_ref()?;
    let args = p.args().as_ref().filter(|a| !a.is_empty())?;
    Some((args, p.env().clone().unwrap_or_default()))
}

/// Find `name` the way `execvp` would, using the container's `PATH`.
fn find_executable(name: &str, env: &[String]) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

impl Executor for ExecveExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let (args, env) = process_parts(spec).ok_or(ExecutorError::InvalidArg)?;
        let path = find_executable(&args[0], &env).ok_or_else(|| {
            ExecutorError::Other(format!("executable {:?} not found in $PATH", args[0]))
        })?;
        let to_c = |s: &str| CString::new(s).map_err(|_| ExecutorError::InvalidArg);
        let path_c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| ExecutorError::InvalidArg)?;
        let argv = args
            .iter()
            .map(|a| to_c(a))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = env.iter().map(|e| to_c(e)).collect::<Result<Vec<_>, _>>()?;
        let err = nix::unistd::execve(&path_c, &argv, &envp).unwrap_err();
        Err(ExecutorError::Other(format!(
            "exec {}: {err}",
            path.display()
        )))
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        // libcontainer calls this in the container's init, after switching
        // to the container's user (which would clear it) and before waiting
        // for "start". From here on the container dies with the process
        // that started it: its parent, since libcontainer clones the init as
        // a sibling of its intermediate child (kiln or its shim). It
        // survives execve (except of a set-user-ID binary). An init whose
        // starter died before this point waits for a start that never
        // comes: the sweep kills it.
        // SAFETY: prctl(2) with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        let (args, env) = process_parts(spec).ok_or_else(|| {
            ExecutorValidationError::ArgValidationError("no command to run".into())
        })?;
        match find_executable(&args[0], &env) {
            Some(p)
                if p.metadata()
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0) =>
            {
                Ok(())
            }
            Some(p) if p.exists() => Err(ExecutorValidationError::ArgValidationError(format!(
                "{:?} ({}) is not an executable file",
                args[0],
                p.display()
            ))),
            _ => Err(ExecutorValidationError::ArgValidationError(format!(
                "executable {:?} not found in $PATH",
                args[0]
            ))),
        }
    }

    fn setup_envs(&self, _envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        Ok(())
    }
}
