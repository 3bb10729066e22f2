//! The file watcher: the directories of every file the config was read
//! from, watched for changes that trigger a reload.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The directories to watch for `files` (editors replace a file by
/// renaming another over it, which only the directory sees).
pub(super) fn watch_dirs(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    files
        .iter()
        .filter_map(|f| f.parent())
        .filter(|d| d.is_dir())
        .map(Path::to_path_buf)
        .collect()
}

/// Watches directories, sending the paths of what changed in them.
pub(super) struct Watcher {
    inner: Option<notify::RecommendedWatcher>,
    dirs: BTreeSet<PathBuf>,
}

impl Watcher {
    pub(super) fn new(tx: tokio::sync::mpsc::UnboundedSender<Vec<PathBuf>>) -> Watcher {
        let inner = notify::recommended_watcher(move |r: notify::Result<notify::Event>| match r {
            Ok(ev) => {
                if !matches!(ev.kind, notify::EventKind::Access(_)) {
                    let _ = tx.send(ev.paths);
                }
            }
            Err(e) => tracing::warn!("file watcher: {e}"),
        });
        match inner {
            Ok(w) => Watcher {
                inner: Some(w),
                dirs: BTreeSet::new(),
            },
            Err(e) => {
                tracing::warn!(
                    "cannot watch the config's files ({e}); reload with SIGHUP or `kiln reconfig`"
                );
                Watcher {
                    inner: None,
                    dirs: BTreeSet::new(),
                }
            }
        }
    }

    /// Watches exactly the directories of `files`.
    pub(super) fn follow(&mut self, files: &[PathBuf]) {
        use notify::Watcher as _;
        let Some(w) = self.inner.as_mut() else {
            return;
        };
        let wanted = watch_dirs(files);
        for gone in self.dirs.difference(&wanted) {
            let _ = w.unwatch(gone);
        }
        for dir in wanted.difference(&self.dirs) {
            if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
                tracing::warn!("cannot watch {}: {e}", dir.display());
            }
        }
        self.dirs = wanted;
    }
}
