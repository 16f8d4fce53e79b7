//! A managed topic as the store keeps it: its configuration and current map, as one versioned
//! document whose version is the map's epoch (so check-and-set guards every map change).

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{ShardMap, TopicConfig};
use crate::store::{Document, ShardStore, StoreError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredTopic {
    pub config: TopicConfig,
    pub map: ShardMap,
}

impl StoredTopic {
    pub fn to_document(&self) -> Result<Document, StoreError> {
        Ok(Document {
            key: self.config.name.clone(),
            version: self.map.epoch,
            value: serde_json::to_value(self).map_err(|e| StoreError::Corrupt {
                key: self.config.name.clone(),
                message: e.to_string(),
            })?,
        })
    }

    pub fn from_document(doc: Document) -> Result<Self, StoreError> {
        let t: StoredTopic =
            serde_json::from_value(doc.value).map_err(|e| StoreError::Corrupt {
                key: doc.key.clone(),
                message: e.to_string(),
            })?;
        if t.config.name != doc.key || t.map.epoch != doc.version {
            return Err(StoreError::Corrupt {
                key: doc.key,
                message: format!(
                    "holds topic {} at epoch {}, filed as version {}",
                    t.config.name, t.map.epoch, doc.version
                ),
            });
        }
        Ok(t)
    }
}

fn topics(docs: Vec<Document>) -> Result<Vec<StoredTopic>, StoreError> {
    docs.into_iter().map(StoredTopic::from_document).collect()
}

/// Shard maps through any store: documents in, maps out.
pub trait TopicStore {
    fn load_topics(&self) -> BoxFuture<'_, Result<Vec<StoredTopic>, StoreError>>;
    /// Writes `topic` if the stored epoch is `expected` (`None`: it must not exist yet).
    fn put_topic<'a>(
        &'a self,
        topic: &'a StoredTopic,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn watch_topics(
        &self,
        index: u64,
    ) -> BoxFuture<'_, Result<(u64, Vec<StoredTopic>), StoreError>>;
}

impl TopicStore for dyn ShardStore {
    fn load_topics(&self) -> BoxFuture<'_, Result<Vec<StoredTopic>, StoreError>> {
        async move { topics(self.load_all().await?) }.boxed()
    }

    fn put_topic<'a>(
        &'a self,
        topic: &'a StoredTopic,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move { self.put(&topic.to_document()?, expected).await }.boxed()
    }

    fn watch_topics(
        &self,
        index: u64,
    ) -> BoxFuture<'_, Result<(u64, Vec<StoredTopic>), StoreError>> {
        async move {
            let (index, docs) = self.watch(index).await?;
            Ok((index, topics(docs)?))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn maps_round_trip_through_the_embedded_store_with_the_epoch_as_version() {
        let dir = std::env::temp_dir().join(format!("sg-stored-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store: std::sync::Arc<dyn ShardStore> =
            std::sync::Arc::new(crate::store::embedded::EmbeddedStore::open(&dir).unwrap());
        let config: TopicConfig = toml::from_str("name = \"orders\"\npool = 8").unwrap();
        let t = StoredTopic {
            map: ShardMap::initial("orders", 4, 8).unwrap(),
            config,
        };
        store.put_topic(&t, None).await.unwrap();
        let mut t2 = t.clone();
        t2.map = t.map.split(0, 1, 5).unwrap();
        assert!(matches!(
            store.put_topic(&t2, Some(7)).await,
            Err(StoreError::Conflict { .. })
        ));
        store.put_topic(&t2, Some(t.map.epoch)).await.unwrap();
        assert_eq!(store.load_topics().await.unwrap(), vec![t2]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
