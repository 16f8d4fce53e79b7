package shardgate.bench;

import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;

import io.kroxylicious.proxy.KafkaProxy;
import io.kroxylicious.proxy.config.ConfigParser;
import io.kroxylicious.proxy.config.Configuration;
import io.kroxylicious.proxy.internal.config.Features;

/**
 * Starts Kroxylicious's KafkaProxy from a YAML config file, for the testbed's peer proxy
 * (`integration/testbed start-kroxylicious`). Kroxylicious's own app (picocli, banner, feature
 * unlocks) is not on Maven Central; this is the part of it a pass-through proxy needs.
 */
public final class PeerProxy {
    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: PeerProxy CONFIG.yaml");
            System.exit(2);
        }
        ConfigParser parser = new ConfigParser(); // also the registry of filter plugins
        Configuration config;
        try (InputStream in = Files.newInputStream(Path.of(args[0]))) {
            config = parser.parseConfiguration(in);
        }
        try (KafkaProxy proxy = new KafkaProxy(parser, config, Features.defaultFeatures())) {
            proxy.startup();
            proxy.block(); // until the JVM is stopped (SIGTERM from `testbed down`)
        }
    }
}
