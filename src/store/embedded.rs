//! The embedded store: one JSON file per managed topic in a local directory, replaced
//! atomically (write to a temporary file, fsync, rename, fsync the directory), so a crash
//! leaves either the old map or the new one, never a torn one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::{Document, ShardStore, StoreError};

pub struct EmbeddedStore {
    dir: PathBuf,
    /// Serialises check-and-set within this process (the store has one writer process).
    lock: Arc<std::sync::Mutex<()>>,
}

impl EmbeddedStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let topics = dir.join("topics");
        std::fs::create_dir_all(&topics).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", topics.display()))
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            lock: Arc::new(std::sync::Mutex::new(())),
        })
    }

    fn file(dir: &Path, key: &str) -> PathBuf {
        dir.join("topics").join(format!("{key}.json"))
    }

    fn read(path: &Path, key: &str) -> Result<Option<Document>, StoreError> {
        match std::fs::read(path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    key: key.to_string(),
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Unavailable(format!(
                "read {}: {e}",
                path.display()
            ))),
        }
    }

    fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    }
}

impl ShardStore for EmbeddedStore {
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Document>, StoreError>> {
        let dir = self.dir.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                let rd = std::fs::read_dir(dir.join("topics"))
                    .map_err(|e| StoreError::Unavailable(format!("list {}: {e}", dir.display())))?;
                for entry in rd {
                    let entry = entry.map_err(|e| StoreError::Unavailable(e.to_string()))?;
                    let name = entry.file_name().to_string_lossy().to_string();
                    if let Some(key) = name.strip_suffix(".json")
                        && let Some(t) = Self::read(&entry.path(), key)?
                    {
                        out.push(t);
                    }
                }
                out.sort_by(|a, b| a.key.cmp(&b.key));
                Ok(out)
            })
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
        }
        .boxed()
    }

    fn put<'a>(
        &'a self,
        doc: &'a Document,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let dir = self.dir.clone();
        let lock = self.lock.clone();
        let doc = doc.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let _g = lock.lock().expect("store lock");
                let path = Self::file(&dir, &doc.key);
                let found = Self::read(&path, &doc.key)?.map(|d| d.version);
                if found != expected {
                    return Err(StoreError::Conflict {
                        key: doc.key,
                        expected,
                        found,
                    });
                }
                let data = serde_json::to_vec_pretty(&doc).map_err(|e| StoreError::Corrupt {
                    key: doc.key.clone(),
                    message: e.to_string(),
                })?;
                Self::write_atomic(&path, &data)
                    .map_err(|e| StoreError::Unavailable(format!("write {}: {e}", path.display())))
            })
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
        }
        .boxed()
    }

    fn describe(&self) -> String {
        format!("embedded store at {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(key: &str, version: u64) -> Document {
        Document {
            key: key.to_string(),
            version,
            value: serde_json::json!({ "shards": version }),
        }
    }

    #[tokio::test]
    async fn writes_are_check_and_set_on_the_version_and_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("sg-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = EmbeddedStore::open(&dir).unwrap();
        let t = doc("orders", 0);
        store.put(&t, None).await.unwrap();
        assert!(matches!(
            store.put(&t, None).await,
            Err(StoreError::Conflict { .. })
        ));
        let t2 = doc("orders", 1);
        assert!(matches!(
            store.put(&t2, Some(7)).await,
            Err(StoreError::Conflict { .. })
        ));
        store.put(&t2, Some(0)).await.unwrap();
        let reopened = EmbeddedStore::open(&dir).unwrap();
        assert_eq!(reopened.load_all().await.unwrap(), vec![t2]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
