import PhotosUI
import SwiftUI

struct ContentView: View {
    @State private var state = ClassificationState()
    @State private var pickedItem: PhotosPickerItem?
    @State private var showingCamera = false

    var body: some View {
        NavigationStack {
            VStack(spacing: 20) {
                photo
                results
                Spacer(minLength: 0)
                buttons
            }
            .padding()
            .navigationTitle("Image Classifier")
        }
        .task { await state.loadModel() }
        .onChange(of: pickedItem) { _, item in
            guard let item else { return }
            pickedItem = nil  // so that the same photo can be picked again
            Task { await state.classify(item) }
        }
        .fullScreenCover(isPresented: $showingCamera) {
            CameraPicker { image in
                showingCamera = false
                if let image {
                    Task { await state.classify(image) }
                }
            }
            .ignoresSafeArea()
        }
    }

    @ViewBuilder private var photo: some View {
        if let image = state.image {
            Image(uiImage: image)
                .resizable()
                .scaledToFit()
                .clipShape(RoundedRectangle(cornerRadius: 12))
                .frame(maxHeight: 360)
        } else {
            ContentUnavailableView("No Photo", systemImage: "photo",
                                   description: Text("Choose a photo or take one to classify it."))
                .frame(maxHeight: 360)
        }
    }

    @ViewBuilder private var results: some View {
        if let message = state.message {
            Text(message)
                .multilineTextAlignment(.center)
                .foregroundStyle(.secondary)
                .textSelection(.enabled)
        } else if state.isClassifying {
            ProgressView()
        } else {
            VStack(spacing: 8) {
                ForEach(state.predictions) { prediction in
                    HStack {
                        Text(prediction.label)
                        Spacer()
                        Text(Double(prediction.confidence), format: .percent.precision(.fractionLength(1)))
                            .monospacedDigit()
                    }
                }
            }
            .font(.title3)
        }
    }

    private var buttons: some View {
        HStack {
            PhotosPicker(selection: $pickedItem, matching: .images) {
                Label("Choose Photo", systemImage: "photo.on.rectangle")
            }
            // The simulator and some iPads have no camera.
            if UIImagePickerController.isSourceTypeAvailable(.camera) {
                Button {
                    showingCamera = true
                } label: {
                    Label("Take Photo", systemImage: "camera")
                }
            }
        }
        .buttonStyle(.borderedProminent)
        .disabled(!state.isReady)
    }
}

/// What the screen shows. The model runs off the main actor; results are published on it.
@MainActor @Observable
final class ClassificationState {
    private(set) var image: UIImage?
    private(set) var predictions: [Prediction] = []
    private(set) var message: String?
    private(set) var isClassifying = false
    private var classifier: Classifier?

    var isReady: Bool { classifier != nil && !isClassifying }

    func loadModel() async {
        guard classifier == nil else { return }
        do {
            classifier = try await Task.detached(priority: .userInitiated) { try Classifier() }.value
        } catch {
            // Includes the "No model installed" message when the app was built without a model.
            message = error.localizedDescription
        }
    }

    func classify(_ item: PhotosPickerItem) async {
        guard let data = try? await item.loadTransferable(type: Data.self),
              let image = UIImage(data: data)  // keeps the EXIF orientation in imageOrientation
        else {
            message = ClassifierError.unreadableImage.localizedDescription
            return
        }
        await classify(image)
    }

    func classify(_ image: UIImage) async {
        guard let classifier else { return }
        self.image = image
        predictions = []
        message = nil
        isClassifying = true
        defer { isClassifying = false }
        do {
            // Core ML and Vision block while they run, so keep them off the main actor.
            let predictions = try await Task.detached(priority: .userInitiated) {
                try classifier.classify(image, count: 3)
            }.value
            self.predictions = predictions
            if predictions.isEmpty {
                message = "The model returned no labels. Is it an image classifier?"
            }
        } catch {
            message = error.localizedDescription
        }
    }
}

/// The system camera for SwiftUI: PhotosPicker only reads the photo library.
struct CameraPicker: UIViewControllerRepresentable {
    /// Called with the photo taken, or nil when cancelled.
    let onFinish: (UIImage?) -> Void

    func makeCoordinator() -> Coordinator { Coordinator(onFinish: onFinish) }

    func makeUIViewController(context: Context) -> UIImagePickerController {
        let picker = UIImagePickerController()
        picker.sourceType = .camera
        picker.delegate = context.coordinator
        return picker
    }

    func updateUIViewController(_ picker: UIImagePickerController, context: Context) {}

    final class Coordinator: NSObject, UIImagePickerControllerDelegate, UINavigationControllerDelegate {
        let onFinish: (UIImage?) -> Void

        init(onFinish: @escaping (UIImage?) -> Void) {
            self.onFinish = onFinish
        }

        func imagePickerController(_ picker: UIImagePickerController,
                                   didFinishPickingMediaWithInfo info: [UIImagePickerController.InfoKey: Any]) {
            onFinish(info[.originalImage] as? UIImage)
        }

        func imagePickerControllerDidCancel(_ picker: UIImagePickerController) {
            onFinish(nil)
        }
    }
}

#Preview {
    ContentView()
}
