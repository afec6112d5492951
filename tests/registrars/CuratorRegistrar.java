// Apache Curator's own x-discovery library, used exactly as a Curator (or Spring Cloud Zookeeper)
// application uses it: registers one service instance and keeps it registered until killed, or
// reads a service's instances and prints what Curator understood of each.
//
// Usage: java -cp <curator jars> CuratorRegistrar.java CONNECT BASE_PATH SERVICE ID ADDRESS PORT
//        java -cp <curator jars> CuratorRegistrar.java query CONNECT BASE_PATH SERVICE
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.retry.ExponentialBackoffRetry;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.ServiceInstance;
import org.apache.curator.x.discovery.UriSpec;

public class CuratorRegistrar {
    public static void main(String[] args) throws Exception {
        if (args.length == 4 && args[0].equals("query")) {
            query(args[1], args[2], args[3]);
        } else if (args.length == 6) {
            register(args);
        } else {
            System.err.println("usage: CuratorRegistrar CONNECT BASE_PATH SERVICE ID ADDRESS PORT");
            System.err.println("       CuratorRegistrar query CONNECT BASE_PATH SERVICE");
            System.exit(2);
        }
    }

    static CuratorFramework connect(String connect) throws InterruptedException {
        CuratorFramework client = CuratorFrameworkFactory.newClient(connect, new ExponentialBackoffRetry(200, 10));
        client.start();
        client.blockUntilConnected();
        return client;
    }

    static void register(String[] args) throws Exception {
        CuratorFramework client = connect(args[0]);
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

    // One line per instance: "instance " and a JSON object of what Curator's getters return. The
    // payload class is Object, so a payload is read as whatever JSON it holds.
    static void query(String connect, String basePath, String service) throws Exception {
        CuratorFramework client = connect(connect);
        ServiceDiscovery<Object> discovery = ServiceDiscoveryBuilder.builder(Object.class)
            .client(client)
            .basePath(basePath)
            .build();
        discovery.start();
        ObjectMapper json = new ObjectMapper();
        for (ServiceInstance<Object> instance : discovery.queryForInstances(service)) {
            Map<String, Object> read = new LinkedHashMap<>();
            read.put("name", instance.getName());
            read.put("id", instance.getId());
            read.put("address", instance.getAddress());
            read.put("port", instance.getPort());
            read.put("sslPort", instance.getSslPort());
            read.put("enabled", instance.isEnabled());
            read.put("serviceType", instance.getServiceType().name());
            read.put("registrationTimeUTC", instance.getRegistrationTimeUTC());
            read.put("uri", instance.buildUriSpec());
            read.put("payload", instance.getPayload());
            System.out.println("instance " + json.writeValueAsString(read));
        }
        System.out.println("queried " + basePath + "/" + service);
        System.out.flush();
        discovery.close();
        client.close();
    }
}
