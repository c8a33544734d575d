//! Plans as async-nats JetStream configs (feature `jetstream`).

use async_nats::jetstream::{consumer, stream};

use crate::plan::{ConsumerPlan, StreamPlan};
use crate::subscription::StartPosition;
use crate::topic::Storage;

impl StreamPlan {
    /// The JetStream stream config.
    pub fn to_jetstream(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: self.subjects.clone(),
            max_age: self.max_age.unwrap_or_default(),
            max_bytes: self.max_bytes.unwrap_or(-1),
            max_messages: self.max_messages.unwrap_or(-1),
            storage: match self.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            num_replicas: self.replicas as usize,
            duplicate_window: self.duplicate_window,
            max_message_size: self.max_message_size as i32,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        }
    }
}

impl ConsumerPlan {
    /// The JetStream durable pull consumer config.
    pub fn to_jetstream(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(self.name.clone()),
            name: Some(self.name.clone()),
            filter_subject: self.filter_subject.clone(),
            deliver_policy: match self.start {
                StartPosition::Latest => consumer::DeliverPolicy::New,
                StartPosition::Earliest => consumer::DeliverPolicy::All,
            },
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            max_ack_pending: self.max_ack_pending,
            inactive_threshold: self.inactive_threshold.unwrap_or_default(),
            ..Default::default()
        }
    }
}
