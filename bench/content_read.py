#!/usr/bin/env python3
"""A consumer that prefers one kind of content (bench/prefetch-content). The producer writes,
directly at Kafka (PRODUCE_BOOTSTRAP), WARM records about pets to WARM_TOPIC and PER records
to each of TOPIC's 6 partitions: about pets on partitions 0 and 1, about markets on 2-5. One
confluent-kafka consumer (BOOTSTRAP), whose fetches hold 64 KiB (less than what is ready),
first reads WARM_TOPIC (what it was delivered until now is pets), then is assigned all of
TOPIC from the beginning. Prints the seconds from that assignment until it has every pets
record (`pets_s`) and every record (`all_s`).

    content_read.py BOOTSTRAP PRODUCE_BOOTSTRAP TOPIC WARM_TOPIC PER [WARM]
"""
import random
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition

PETS = ("cat dog kitten puppy mat sofa purrs barks fur leash bowl toy sleeps garden vet "
        "whiskers tail paws collar treat").split()
MARKETS = ("stock market shares index fell rose investors bond yield earnings trading price "
           "rally dollar inflation futures equity broker dividend sharply").split()


def sentence(words, rnd):
    return "The " + " ".join(rnd.choice(words) for _ in range(24))


def produce(bootstrap, topic, partitions_words, per):
    rnd = random.Random(7)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": 1})
    for i in range(per):
        for partition, words in partitions_words:
            while True:
                try:
                    p.produce(topic, value=sentence(words, rnd).encode(), partition=partition)
                    break
                except BufferError:
                    p.poll(0.01)
    p.flush(60)


def main():
    bootstrap, produce_bootstrap, topic, warm_topic = sys.argv[1:5]
    per = int(sys.argv[5])
    warm = int(sys.argv[6]) if len(sys.argv) > 6 else 3000
    produce(produce_bootstrap, warm_topic, [(0, PETS)], warm)
    produce(produce_bootstrap, topic, [(p, PETS if p < 2 else MARKETS) for p in range(6)], per)
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-content",
            "enable.auto.commit": False,
            "fetch.max.bytes": 65536,
            "message.max.bytes": 65536,
            "max.partition.fetch.bytes": 65536,
            "queued.max.messages.kbytes": 256,
            # Fetch again as soon as the local queue has room (the default waits up to 1 s,
            # and that wait, not the fetch path, then decides how long the read takes).
            "fetch.queue.backoff.ms": 10,
        }
    )
    c.assign([TopicPartition(warm_topic, 0, 0)])
    got = 0
    deadline = time.time() + 120
    while got < warm and time.time() < deadline:
        m = c.poll(0.1)
        if m is not None and m.error() is None:
            got += 1
    if got < warm:
        raise SystemExit(f"warm-up read {got} of {warm}")
    time.sleep(1.0)  # the last samples embedded
    c.assign([TopicPartition(topic, p, 0) for p in range(6)])
    began = time.time()
    pets = total = 0
    pets_s = None
    deadline = began + 300
    while total < 6 * per and time.time() < deadline:
        m = c.poll(0.1)
        if m is None or m.error() is not None:
            continue
        total += 1
        if m.partition() < 2:
            pets += 1
            if pets == 2 * per:
                pets_s = time.time() - began
    all_s = time.time() - began
    c.close()
    if total < 6 * per:
        raise SystemExit(f"read {total} of {6 * per} records")
    print(f"summary pets_s={pets_s:.3f} all_s={all_s:.3f} records={total}")


if __name__ == "__main__":
    main()
