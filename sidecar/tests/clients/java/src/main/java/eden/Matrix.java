package eden;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.util.Set;
import java.util.concurrent.Callable;
import java.util.function.Consumer;

/** What the Java programs of the client matrix (sidecar/tests/clients.rs) share: the driver's protocol. */
final class Matrix {
    private static final BufferedReader INPUT = new BufferedReader(new InputStreamReader(System.in));

    private Matrix() {}

    /** Asks the driver for `what` and waits until it is done. */
    static void step(String what) throws IOException {
        System.out.println("step " + what);
        System.out.flush();
        if (INPUT.readLine() == null) {
            throw new IOException("the driver went away");
        }
    }

    /** Prints the scenario's result, or its error. */
    static void report(String name, Callable<Object> scenario) {
        String result;
        try {
            result = String.valueOf(scenario.call());
        } catch (Exception error) {
            result = "error " + error;
        }
        System.out.println(name + " " + result);
        System.out.flush();
    }

    /** Runs `work` on `threads` threads at once and waits for them. */
    static void concurrently(int threads, Runnable work) throws InterruptedException {
        Thread[] started = new Thread[threads];
        for (int i = 0; i < threads; i++) {
            started[i] = new Thread(work);
            started[i].start();
        }
        for (Thread thread : started) {
            thread.join();
        }
    }

    /** Publishes `text` until the subscriber has it in `received` (it may be reconnecting). */
    static String receive(Set<String> received, String text, Consumer<String> publish) {
        for (int i = 0; i < 50 && !received.contains(text); i++) {
            publish.accept(text);
            sleep(100);
        }
        return received.contains(text) ? text : "no " + text;
    }

    static void sleep(long millis) {
        try {
            Thread.sleep(millis);
        } catch (InterruptedException interrupted) {
            Thread.currentThread().interrupt();
        }
    }

    static final String SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])";
    static final String LIBRARY = "#!lua name=matrix\n"
            + "redis.register_function('bump', function(keys, args) return redis.call('INCRBY', keys[1], args[1]) end)";
}
