import SwiftUI

@main
struct ImageClassifierApp: App {
    var body: some Scene {
        WindowGroup {
            ContentView()
        }
    }
}
