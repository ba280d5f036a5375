//! Watching config files: one callback per burst of changes under the given paths. Used by the
//! proxy's static mode and by the control plane; both re-run the whole load → analyze → compile
//! pipeline on a change, so the watcher need not say what changed.

use std::path::{Path, PathBuf};

pub use notify;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

/// Calls `on_change` (from the watcher's thread) whenever something under `paths` changes.
/// Files are watched through their directory, since editors replace files by renaming over
/// them. Keep the returned watcher alive for as long as changes matter.
pub fn watch(
    paths: &[PathBuf],
    recursive: bool,
    on_change: impl Fn() + Send + 'static,
) -> notify::Result<RecommendedWatcher> {
    let files: Vec<PathBuf> = paths.iter().filter(|p| !p.is_dir()).map(|p| absolute(p)).collect();
    let dirs: Vec<PathBuf> = paths.iter().filter(|p| p.is_dir()).map(|p| absolute(p)).collect();
    // Only config files matter: a log file written next to the config must not cause reloads.
    let relevant = move |p: &Path| {
        if files.iter().any(|f| f == p) {
            return true;
        }
        let is_config = p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        let hidden = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        is_config && !hidden && dirs.iter().any(|d| p.starts_with(d))
    };
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            if !ev.kind.is_access() && ev.paths.iter().any(|p| relevant(p)) {
                on_change();
            }
        }
    })?;
    for p in paths {
        let p = absolute(p);
        if p.is_dir() {
            let mode = if recursive { RecursiveMode::Recursive } else { RecursiveMode::NonRecursive };
            watcher.watch(&p, mode)?;
        } else {
            let dir = p.parent().unwrap_or(Path::new("/"));
            watcher.watch(dir, RecursiveMode::NonRecursive)?;
        }
    }
    Ok(watcher)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
