// franz-client: a small franz-go (github.com/twmb/franz-go) client used by the
// shardgate integration testbed. franz-go is a pure-Go Kafka client that uses a
// different request mix than librdkafka / the Java client (it negotiates the
// newest API versions, uses KIP-848-free classic groups, fetch sessions, etc.),
// so it is a useful third client implementation to put through the proxy.
//
// Usage:
//
//	franz-client produce --brokers B --topic T --count N [--codec none|gzip|snappy|lz4|zstd] [--key-prefix P]
//	franz-client consume --brokers B --topic T --group G --count N [--timeout S] [--print]
//	franz-client admin create|describe|delete --brokers B --topic T [--partitions P] [--rf R]
//
// Output contract (parsed by shell tests):
//
//	produce: last stdout line "acked=N"; exit 1 if any record failed.
//	consume: with --print, one stdout line per record "key value partition offset";
//	         last stdout line "consumed=N"; exit 1 if fewer than --count arrived
//	         before --timeout.
//	admin:   human readable; exit 1 on error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "produce":
		err = produce(os.Args[2:])
	case "consume":
		err = consume(os.Args[2:])
	case "admin":
		err = admin(os.Args[2:])
	case "-h", "--help", "help":
		usage()
	default:
		fmt.Fprintf(os.Stderr, "unknown subcommand %q\n", os.Args[1])
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "franz-client:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, `usage:
  franz-client produce --brokers B --topic T --count N [--codec none|gzip|snappy|lz4|zstd] [--key-prefix P] [--timeout S]
  franz-client consume --brokers B --topic T --group G --count N [--timeout S] [--print]
  franz-client admin create|describe|delete --brokers B --topic T [--partitions P] [--rf R]`)
	os.Exit(2)
}

func splitBrokers(s string) []string {
	var out []string
	for _, b := range strings.Split(s, ",") {
		if b = strings.TrimSpace(b); b != "" {
			out = append(out, b)
		}
	}
	return out
}

func codecOpt(name string) (kgo.CompressionCodec, error) {
	switch name {
	case "none", "":
		return kgo.NoCompression(), nil
	case "gzip":
		return kgo.GzipCompression(), nil
	case "snappy":
		return kgo.SnappyCompression(), nil
	case "lz4":
		return kgo.Lz4Compression(), nil
	case "zstd":
		return kgo.ZstdCompression(), nil
	}
	return kgo.NoCompression(), fmt.Errorf("unknown codec %q", name)
}

func produce(args []string) error {
	fs := flag.NewFlagSet("produce", flag.ExitOnError)
	brokers := fs.String("brokers", "127.0.0.1:29092", "comma separated bootstrap brokers")
	topic := fs.String("topic", "", "topic")
	count := fs.Int("count", 100, "records to produce")
	codec := fs.String("codec", "none", "none|gzip|snappy|lz4|zstd")
	prefix := fs.String("key-prefix", "key-", "record key prefix; keys are <prefix><i>")
	timeout := fs.Duration("timeout", 60*time.Second, "overall deadline (e.g. 30s)")
	fs.Parse(args)
	if *topic == "" {
		return errors.New("--topic is required")
	}
	c, err := codecOpt(*codec)
	if err != nil {
		return err
	}
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(splitBrokers(*brokers)...),
		kgo.DefaultProduceTopic(*topic),
		kgo.RequiredAcks(kgo.AllISRAcks()), // acks=all (also the franz-go default, stated for clarity)
		kgo.ProducerBatchCompression(c),
		kgo.ProducerLinger(5*time.Millisecond),
		kgo.RecordDeliveryTimeout(*timeout),
	)
	if err != nil {
		return err
	}
	defer cl.Close()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	var acked, failed atomic.Int64
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	for i := 0; i < *count; i++ {
		wg.Add(1)
		r := &kgo.Record{
			Key:   []byte(fmt.Sprintf("%s%d", *prefix, i)),
			Value: []byte(fmt.Sprintf("value-%d", i)),
		}
		cl.Produce(ctx, r, func(_ *kgo.Record, err error) {
			defer wg.Done()
			if err != nil {
				failed.Add(1)
				once.Do(func() { firstErr = err })
				return
			}
			acked.Add(1)
		})
	}
	wg.Wait()
	fmt.Printf("acked=%d\n", acked.Load())
	if n := failed.Load(); n > 0 {
		return fmt.Errorf("%d records failed, first error: %v", n, firstErr)
	}
	return nil
}

func consume(args []string) error {
	fs := flag.NewFlagSet("consume", flag.ExitOnError)
	brokers := fs.String("brokers", "127.0.0.1:29092", "comma separated bootstrap brokers")
	topic := fs.String("topic", "", "topic")
	group := fs.String("group", "", "consumer group id")
	count := fs.Int("count", 100, "stop after this many records")
	timeoutS := fs.Int("timeout", 30, "give up after this many seconds")
	print := fs.Bool("print", false, "print one line per record: key value partition offset")
	fs.Parse(args)
	if *topic == "" || *group == "" {
		return errors.New("--topic and --group are required")
	}
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(splitBrokers(*brokers)...),
		kgo.ConsumerGroup(*group),
		kgo.ConsumeTopics(*topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		// Commit explicitly after each poll, only what we actually counted, so a
		// second consumer in the same group resumes exactly after our last record.
		kgo.DisableAutoCommit(),
	)
	if err != nil {
		return err
	}
	defer cl.Close() // leaves the group

	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(*timeoutS)*time.Second)
	defer cancel()

	consumed := 0
	for consumed < *count {
		fetches := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			break
		}
		var fatal error
		fetches.EachError(func(t string, p int32, err error) {
			// Retriable errors are handled inside the client; surface the rest.
			fmt.Fprintf(os.Stderr, "fetch error topic=%s partition=%d: %v\n", t, p, err)
			if errors.Is(err, kgo.ErrClientClosed) {
				fatal = err
			}
		})
		if fatal != nil {
			return fatal
		}
		var batch []*kgo.Record
		fetches.EachRecord(func(r *kgo.Record) {
			if consumed >= *count {
				return
			}
			consumed++
			batch = append(batch, r)
			if *print {
				fmt.Printf("%s %s %d %d\n", r.Key, r.Value, r.Partition, r.Offset)
			}
		})
		if len(batch) > 0 {
			cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := cl.CommitRecords(cctx, batch...); err != nil {
				fmt.Fprintln(os.Stderr, "commit failed:", err)
			}
			ccancel()
		}
	}
	fmt.Printf("consumed=%d\n", consumed)
	if consumed < *count {
		return fmt.Errorf("timed out after %ds with %d/%d records", *timeoutS, consumed, *count)
	}
	return nil
}

func admin(args []string) error {
	if len(args) < 1 {
		usage()
	}
	op := args[0]
	fs := flag.NewFlagSet("admin "+op, flag.ExitOnError)
	brokers := fs.String("brokers", "127.0.0.1:29092", "comma separated bootstrap brokers")
	topic := fs.String("topic", "", "topic")
	partitions := fs.Int("partitions", 1, "partitions (create)")
	rf := fs.Int("rf", 1, "replication factor (create)")
	timeout := fs.Duration("timeout", 30*time.Second, "deadline")
	fs.Parse(args[1:])
	if *topic == "" {
		return errors.New("--topic is required")
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(splitBrokers(*brokers)...))
	if err != nil {
		return err
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	switch op {
	case "create":
		resp, err := adm.CreateTopic(ctx, int32(*partitions), int16(*rf), nil, *topic)
		if err != nil {
			return err
		}
		if resp.Err != nil {
			return fmt.Errorf("create %s: %w", *topic, resp.Err)
		}
		fmt.Printf("created topic=%s partitions=%d rf=%d\n", resp.Topic, *partitions, *rf)
	case "delete":
		resps, err := adm.DeleteTopics(ctx, *topic)
		if err != nil {
			return err
		}
		for _, r := range resps {
			if r.Err != nil {
				return fmt.Errorf("delete %s: %w", r.Topic, r.Err)
			}
			fmt.Printf("deleted topic=%s\n", r.Topic)
		}
	case "describe":
		md, err := adm.Metadata(ctx, *topic)
		if err != nil {
			return err
		}
		td, ok := md.Topics[*topic]
		if !ok {
			return fmt.Errorf("topic %s not in metadata", *topic)
		}
		if td.Err != nil {
			return fmt.Errorf("describe %s: %w", *topic, td.Err)
		}
		fmt.Printf("topic=%s partitions=%d brokers=%d controller=%d\n",
			td.Topic, len(td.Partitions), len(md.Brokers), md.Controller)
		ps := td.Partitions.Sorted()
		sort.Slice(ps, func(i, j int) bool { return ps[i].Partition < ps[j].Partition })
		for _, p := range ps {
			errs := ""
			if p.Err != nil {
				errs = " err=" + p.Err.Error()
			}
			fmt.Printf("  partition=%d leader=%d epoch=%d replicas=%v isr=%v%s\n",
				p.Partition, p.Leader, p.LeaderEpoch, p.Replicas, p.ISR, errs)
		}
	default:
		return fmt.Errorf("unknown admin op %q (create|describe|delete)", op)
	}
	return nil
}
