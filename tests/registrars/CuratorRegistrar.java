// Registers one service instance with Apache Curator's own x-discovery library, exactly as a
// Curator (or Spring Cloud Zookeeper) application does, and keeps it registered until killed.
//
// Usage: java -cp <curator jars> CuratorRegistrar.java CONNECT BASE_PATH SERVICE ID ADDRESS PORT
import java.util.concurrent.CountDownLatch;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.retry.ExponentialBackoffRetry;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.ServiceInstance;
import org.apache.curator.x.discovery.UriSpec;

public class CuratorRegistrar {
    public static void main(String[] args) throws Exception {
        if (args.length != 6) {
            System.err.println("usage: CuratorRegistrar CONNECT BASE_PATH SERVICE ID ADDRESS PORT");
            System.exit(2);
        }
        CuratorFramework client = CuratorFrameworkFactory.newClient(args[0], new ExponentialBackoffRetry(200, 10));
        client.start();
        client.blockUntilConnected();
        ServiceInstance<Void> instance = ServiceInstance.<Void>builder()
            .name(args[2])
            .id(args[3])
            .address(args[4])
            .port(Integer.parseInt(args[5]))
            .uriSpec(new UriSpec("{scheme}://{address}:{port}"))
            .build();
        ServiceDiscovery<Void> discovery = ServiceDiscoveryBuilder.builder(Void.class)
            .client(client)
            .basePath(args[1])
            .thisInstance(instance)
            .build();
        discovery.start();
        System.out.println("registered " + args[1] + "/" + args[2] + "/" + args[3]);
        System.out.flush();
        new CountDownLatch(1).await();
    }
}
